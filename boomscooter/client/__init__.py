"""The boomscooter SDK: producing to and subscribing to a replicated log.

* :class:`Producer` (asyncio) and :class:`SyncProducer` (blocking, a background thread):
  batching with linger, a bounded in-flight window with backpressure, futures resolving to
  seqnos, ``flush()``, idempotent retries (:mod:`boomscooter.client.producer`);
* :class:`Subscriber`: committed records in order, exactly once, in multicast, unicast
  or notifications mode, async or blocking (:mod:`boomscooter.client.subscriber`);
* :class:`ProduceResult`, :class:`AckLevel`: what ``send_batch`` resolves to, and the ack
  levels ``none`` / ``leader`` / ``quorum``.

Errors are the client classes of :mod:`boomscooter.errors` (``ServerUnavailableError``,
``NotLeaderError``, ``ExpectedSeqnoError``, ``RequestError``).
"""

from boomscooter.client._accumulator import AckLevel, ProduceResult
from boomscooter.client.producer import Producer
from boomscooter.client.subscriber import Subscriber
from boomscooter.client.sync_producer import SyncProducer

__all__ = ["AckLevel", "ProduceResult", "Producer", "Subscriber", "SyncProducer"]
