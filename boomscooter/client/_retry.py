"""Retrying a lost server, one policy for every subscriber mode.

:class:`Retry` keeps how long calls have been failing: a retriable failure sleeps an
exponential backoff (0.1 s doubling to 2 s, never past the deadline) and a failure that
lasts past ``timeout_s`` — or is not retriable — is raised as the client error it is
(``ServerUnavailableError`` naming the time given up after; ``OUT_OF_RANGE`` as
``TrimmedError``). A success resets it.
"""

from __future__ import annotations

import asyncio

import grpc

from boomscooter.errors import ServerUnavailableError, TrimmedError
from boomscooter.rpc import error_from_rpc

FIRST_DELAY_S = 0.1
MAX_DELAY_S = 2.0


class Retry:
    def __init__(self, timeout_s: float, *, address: str = "", connecting: bool = False) -> None:
        self.timeout_s = timeout_s
        self.address = address
        self.connecting = connecting  # never reached yet: "cannot reach", not "lost"
        self.failures = 0
        self._since: float | None = None
        self._delay = FIRST_DELAY_S

    def succeeded(self) -> None:
        self._since = None
        self._delay = FIRST_DELAY_S

    async def failed(self, exc: grpc.aio.AioRpcError) -> None:
        """Back off after a failed call, or raise when retrying is over."""
        error = error_from_rpc(exc, address=self.address)
        if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
            raise TrimmedError(str(error), first_seqno=0) from exc
        if not error.retriable:
            raise error from exc
        now = asyncio.get_running_loop().time()
        if self._since is None:
            self._since = now
        left = self._since + self.timeout_s - now
        if left <= 0:
            if self.connecting:
                raise ServerUnavailableError(
                    f"cannot reach {self.address or 'the server'} for {self.timeout_s:.0f} s: "
                    f"{error}"
                ) from exc
            raise ServerUnavailableError(
                f"lost the server: no answer for {self.timeout_s:.0f} s ({error})"
            ) from exc
        self.failures += 1
        await asyncio.sleep(min(self._delay, left))
        self._delay = min(self._delay * 2, MAX_DELAY_S)
