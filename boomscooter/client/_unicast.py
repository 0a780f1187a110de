"""Unicast mode: the ``Subscribe`` server stream (where multicast does not reach).

The server sends committed records only, as whole batches; with a channel prefix it
skips batches without a matching record, so a response may begin past where the previous
one ended (:meth:`Delivery.skip_to`). A broken stream is resubscribed from where delivery
stands, with backoff, for up to ``server_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from boomscooter.client._retry import Retry
from boomscooter.client.delivery import Delivery, GapError
from boomscooter.storage.batch import Record, split_batches
from boomscooter.v1 import boomscooter_pb2 as pb
from bootcast.logs import get_logger

log = get_logger("boomscooter.subscriber")


class UnicastEngine:
    def __init__(
        self,
        stub: Any,
        delivery: Delivery,
        *,
        emit: Callable[[list[Record]], Awaitable[None]],
        server_timeout_s: float,
    ) -> None:
        self.stub = stub
        self.delivery = delivery
        self.emit = emit
        self.server_timeout_s = server_timeout_s
        self.stats = {"responses": 0, "reconnects": 0}

    def _request(self) -> pb.SubscribeRequest:
        delivery = self.delivery
        request = pb.SubscribeRequest(seqno=delivery.received_end)
        if delivery.until is not None:
            request.until_seqno = delivery.until
        if delivery.channel is not None:
            request.channel_prefix = delivery.channel
        return request

    async def run(self) -> None:
        retry = Retry(self.server_timeout_s)
        while not self.delivery.done:
            try:
                async for response in self.stub.Subscribe(self._request()):
                    retry.succeeded()
                    await self._handle(response)
                    if self.delivery.done:
                        return
                if self.delivery.until is not None:
                    return  # the server ended the range
            except grpc.aio.AioRpcError as exc:
                log.info(
                    "subscriber.resubscribe",
                    error=exc.code().name,
                    seqno=self.delivery.received_end,
                )
                await retry.failed(exc)
                self.stats["reconnects"] += 1

    async def _handle(self, response: pb.SubscribeResponse) -> None:
        self.stats["responses"] += 1
        delivery = self.delivery
        delivery.commit(response.commit_seqno)
        if not response.batches:
            return
        delivery.commit(response.last_seqno)  # the server sends committed records only
        records: list[Record] = []
        for batch in split_batches(response.batches):
            if batch.base_seqno > delivery.received_end:  # filtered out by the server?
                if delivery.channel is None:  # nothing is filtered: seqnos went missing
                    raise GapError(
                        f"the server skipped seqnos {delivery.received_end}.."
                        f"{batch.base_seqno - 1} of an unfiltered subscription"
                    )
                records.extend(delivery.release())
                delivery.skip_to(batch.base_seqno)
            delivery.add(batch)
        records.extend(delivery.release())
        if (
            response.last_seqno + 1 > delivery.received_end
            and not delivery.done
            and delivery.channel is not None
        ):
            delivery.skip_to(response.last_seqno + 1)
        if records:
            await self.emit(records)
