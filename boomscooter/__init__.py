"""boomscooter: a replicated append-only log over the bootcast page stream.

The SDK (``boomscooter.Producer``, ``boomscooter.SyncProducer``, ``boomscooter.Subscriber``,
``boomscooter.Record``) is imported on first use, so ``import boomscooter.storage`` does not
pay for gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from boomscooter.client import AckLevel, Producer, ProduceResult, Subscriber, SyncProducer
    from boomscooter.storage import Entry, Record

__all__ = [
    "AckLevel",
    "Entry",
    "ProduceResult",
    "Producer",
    "Record",
    "Subscriber",
    "SyncProducer",
]


def __getattr__(name: str) -> Any:
    if name in ("Entry", "Record"):
        from boomscooter import storage

        return getattr(storage, name)
    if name in __all__:
        from boomscooter import client

        return getattr(client, name)
    raise AttributeError(f"module 'boomscooter' has no attribute {name!r}")
