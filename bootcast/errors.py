"""Errors of the bootcast package.

One root class, :class:`BootcastError`. ``LocalProtocolError`` means *we* were asked to do
something the protocol forbids (a programmer or configuration error); ``RemoteProtocolError``
means the peer sent something malformed. Each class says whether retrying can help and which
HTTP status it maps to at the server edge (translation happens only in ``server.py``).
"""

from __future__ import annotations


class BootcastError(Exception):
    """Root of every bootcast error."""

    retriable: bool = False
    http_status: int = 500


class LocalProtocolError(BootcastError):
    """We were asked to produce something the protocol does not allow."""

    http_status = 500


class RemoteProtocolError(BootcastError):
    """A peer sent malformed bytes (a datagram, a join reply, a NACK body)."""

    http_status = 400


class ConfigError(BootcastError):
    """Bad command-line or constructor arguments. ``option`` names the flag at fault (a
    program that sets it under another name says so with :meth:`renamed`)."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(f"{option} {message}" if option else message)
        self.option = option
        self.detail = message

    def renamed(self, names: dict[str, str]) -> str:
        """The message, with the flag as the caller's program calls it."""
        if self.option is None:
            return str(self)
        return f"{names.get(self.option, self.option)} {self.detail}"


class PathRejected(BootcastError):
    """A requested path escapes the served root or names something that is not a file."""

    http_status = 404


class FetchError(BootcastError):
    """A fetch could not produce a verified file. The message is the one-line reason."""


class FetchTimeout(FetchError):
    """No progress within the timeout."""

    retriable = True


class NoPagesArrived(FetchTimeout):
    """The join worked but not one page arrived."""


class VerificationFailed(FetchError):
    """The assembled file does not match SIZE= or SHA256= from the join reply."""


class SourceChanged(BootcastError):
    """A served file shrank or vanished while it was being read: the cast stops."""
