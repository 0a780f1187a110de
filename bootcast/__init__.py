"""bootcast: multicast file casting with NACK repair, pacing and a curl-like fetch.

Public API: :class:`ServeConfig` / :func:`start_server` (the server), :class:`FetchConfig` /
:func:`fetch` (the client), the sans-I/O cores :class:`CastCore` and :class:`ReceiverCore`,
the page codec (``bootcast.page``) and the errors.
"""

from .cast import CastCore
from .client import FetchConfig, FetchResult, fetch
from .errors import BootcastError, FetchError
from .joinreply import JoinReply
from .receiver import ReceiverCore
from .server import ServeConfig, start_server

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
