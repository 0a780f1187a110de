"""bootcast: multicast file casting with NACK repair, pacing and a curl-like fetch.

Public API: :class:`ServeConfig` / :func:`start_server` (the server), :class:`FetchConfig` /
:func:`fetch` (the client), the sans-I/O cores :class:`CastCore` and :class:`ReceiverCore`,
the page codec (``bootcast.page``) and the errors. Names are imported on first use, so
``bootcast fetch`` does not pay for the server's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cast import CastCore
    from .client import FetchConfig, FetchResult, fetch
    from .errors import BootcastError, FetchError
    from .joinreply import JoinReply
    from .receiver import ReceiverCore
    from .server import ServeConfig, start_server

_WHERE = {
    "BootcastError": "errors",
    "CastCore": "cast",
    "FetchConfig": "client",
    "FetchError": "errors",
    "FetchResult": "client",
    "JoinReply": "joinreply",
    "ReceiverCore": "receiver",
    "ServeConfig": "server",
    "fetch": "client",
    "start_server": "server",
}

__all__ = [
    "BootcastError",
    "CastCore",
    "FetchConfig",
    "FetchError",
    "FetchResult",
    "JoinReply",
    "ReceiverCore",
    "ServeConfig",
    "fetch",
    "start_server",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bootcast' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
