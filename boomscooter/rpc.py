"""The client side of the rpc edge, shared by the SDK (producer, subscriber), the CLI and
nodes calling other nodes.

* :func:`create_channel`: a ``grpc.aio`` channel with the options every SDK connection
  wants — message size limits large enough for whole batches, keepalive pings so a dead
  peer (half-open TCP, a leader's host gone) is noticed within seconds instead of at the
  next write, and gRPC's own transparent retries off (the SDK retries idempotently itself).
* :func:`error_from_status`, :func:`error_from_rpc`, :func:`error_from_pb`: the one place
  where gRPC status codes and the in-band ``Error`` message become
  :mod:`boomscooter.errors` client errors, so callers catch domain classes, never
  ``grpc.aio.AioRpcError``; and the way back for servers, :func:`grpc_status` and
  :func:`error_to_pb` (an error's ``grpc_status`` name; ``INTERNAL`` for anything else).

Mapping of status codes: ``FAILED_PRECONDITION`` with a leader address is
:class:`NotLeaderError`, with a next seqno :class:`ExpectedSeqnoError`; ``OUT_OF_RANGE``
with a first seqno is :class:`TrimmedError`; the codes of a lost or failing connection
(``UNAVAILABLE``, ``CANCELLED``, ``DEADLINE_EXCEEDED``, ``ABORTED``, ``INTERNAL``,
``UNKNOWN``) are :class:`ServerUnavailableError` (retriable); every other code is a
:class:`RequestError` carrying the code's name. An in-band ``Error`` states its own
``retriable``, which then overrides the class default on the instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from boomscooter.errors import (
    BoomscooterError,
    ClientError,
    ExpectedSeqnoError,
    NotLeaderError,
    RequestError,
    ServerUnavailableError,
    TrimmedError,
)
from boomscooter.v1 import boomscooter_pb2

# Room for a batch of the largest default size and then some; the server has its own limit.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# A call's peer that answers no ping for KEEPALIVE_TIME + KEEPALIVE_TIMEOUT (a frozen or
# vanished leader) fails the call: a producer then goes to the next node within ~4 s.
DEFAULT_KEEPALIVE_TIME_S = 2.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 2.0

# Status codes that mean "the connection or the server is in trouble; try again".
UNAVAILABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
_BY_NAME: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "channel_options",
    "create_channel",
    "error_from_pb",
    "error_from_rpc",
    "error_from_status",
    "error_to_pb",
    "grpc_status",
    "status_code",
]


def channel_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = DEFAULT_KEEPALIVE_TIME_S,
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
) -> list[tuple[str, Any]]:
    """The gRPC channel arguments of an SDK connection."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        # Pings only while a call is open, as servers' default policy allows.
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
        # Reconnect quickly after a leader restart; the SDK has its own overall deadline.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def create_channel(
    address: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = DEFAULT_KEEPALIVE_TIME_S,
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An insecure ``grpc.aio`` channel to ``address`` ("host:port"); ``options`` are
    added after (and so override) the defaults. Must be called with a running loop."""
    merged = dict(
        channel_options(
            max_message_bytes=max_message_bytes,
            keepalive_time_s=keepalive_time_s,
            keepalive_timeout_s=keepalive_timeout_s,
        )
    )
    merged.update(options)
    return grpc.aio.insecure_channel(address, options=list(merged.items()))


def status_code(code: grpc.StatusCode | int | str) -> grpc.StatusCode:
    """A status code from its enum, number (google.rpc.Code) or name; UNKNOWN otherwise."""
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return _BY_NAME.get(code.upper(), grpc.StatusCode.UNKNOWN)


def error_from_status(
    code: grpc.StatusCode | int | str,
    message: str,
    *,
    retriable: bool | None = None,
    next_seqno: int | None = None,
    leader_address: str | None = None,
    first_seqno: int | None = None,
) -> ClientError:
    """The client error for a status ``code`` and what came with it (see the module
    docstring). ``retriable`` (an in-band ``Error``'s own verdict) overrides the class's."""
    status = status_code(code)
    error: ClientError
    if status is grpc.StatusCode.FAILED_PRECONDITION and leader_address:
        error = NotLeaderError(message, leader_address=leader_address)
    elif status is grpc.StatusCode.FAILED_PRECONDITION and next_seqno is not None:
        error = ExpectedSeqnoError(message, next_seqno=next_seqno)
    elif status is grpc.StatusCode.OUT_OF_RANGE and first_seqno is not None:
        error = TrimmedError(message, first_seqno=first_seqno)
    elif status in UNAVAILABLE_CODES:
        error = ServerUnavailableError(f"{status.name}: {message}")
    else:
        error = RequestError(message, code=status.name)
    if retriable is not None and retriable != error.retriable:
        error.retriable = retriable
    return error


def error_from_rpc(exc: grpc.aio.AioRpcError, *, address: str = "") -> ClientError:
    """The client error for a failed call; ``address`` (the peer) is named in the message."""
    details = exc.details() or ""
    where = f" ({address})" if address else ""
    error = error_from_status(exc.code(), f"{details}{where}")
    error.__cause__ = exc
    return error


def error_from_pb(error: boomscooter_pb2.Error) -> ClientError:
    """The client error for an in-band ``Error`` (Produce's per-batch failures)."""
    return error_from_status(
        error.code,
        error.message,
        retriable=error.retriable,
        next_seqno=error.next_seqno if error.HasField("next_seqno") else None,
        leader_address=error.leader_address if error.HasField("leader_address") else None,
    )


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The status a server answers ``exc`` with."""
    name = getattr(exc, "grpc_status", "INTERNAL")
    return _BY_NAME.get(name, grpc.StatusCode.INTERNAL)


def error_to_pb(exc: BaseException) -> boomscooter_pb2.Error:
    """``exc`` as an in-band ``Error`` (what :func:`error_from_pb` reads back)."""
    if not isinstance(exc, ClientError | BoomscooterError):
        return boomscooter_pb2.Error(
            code=grpc.StatusCode.INTERNAL.value[0], message=f"internal error: {exc!r}"
        )
    error = boomscooter_pb2.Error(
        code=grpc_status(exc).value[0], message=str(exc), retriable=exc.retriable
    )
    if isinstance(exc, ExpectedSeqnoError):
        error.next_seqno = exc.next_seqno
    if isinstance(exc, NotLeaderError) and exc.leader_address:
        error.leader_address = exc.leader_address
    return error
