"""Errors of the boomscooter package.

One root class, :class:`BoomscooterError`. As in h11, ``LocalProtocolError`` means *we* were
asked to do something the format or protocol forbids (a programmer or configuration error)
and ``RemoteProtocolError`` means a peer (or a file written by one) handed us malformed
bytes. Every class says whether retrying can help (``retriable``) and which gRPC status code
it becomes at the rpc edge (``grpc_status``, the code's name as a plain string: grpc is not
a dependency of the storage layer; the servicers translate in one place).
"""

from __future__ import annotations


class BoomscooterError(Exception):
    """Root of every boomscooter error."""

    retriable: bool = False
    grpc_status: str = "INTERNAL"


class ConfigError(BoomscooterError, ValueError):
    """Bad command-line or constructor arguments."""

    grpc_status = "INVALID_ARGUMENT"


class LocalProtocolError(BoomscooterError):
    """We were asked to produce something the format does not allow (e.g. an empty batch)."""

    grpc_status = "INVALID_ARGUMENT"


class RemoteProtocolError(BoomscooterError):
    """Bytes from a peer are malformed."""

    grpc_status = "INVALID_ARGUMENT"


class BatchEncodeError(LocalProtocolError):
    """Entries cannot be encoded as a batch (empty, a field out of range, too large)."""


class BatchDecodeError(RemoteProtocolError):
    """Bytes are not a valid batch: bad magic or version, bad length, CRC32C mismatch,
    inconsistent record framing."""


class StorageError(BoomscooterError):
    """Root of the errors of the log storage."""


class CorruptLogError(StorageError):
    """The files of a log are damaged in a way recovery must not repair on its own: mid-file
    or sealed-segment corruption, a gap between segments, a foreign file header.

    ``path`` and ``offset`` name the first damaged byte; opening with ``repair=True``
    truncates the log there (the operator's explicit decision to drop what follows).
    """

    grpc_status = "DATA_LOSS"

    def __init__(self, message: str, *, path: str = "", offset: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class SeqnoGapError(StorageError):
    """A batch does not continue the log: its base seqno is not the log's next seqno."""

    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, expected: int, got: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class SeqnoOutOfRangeError(StorageError):
    """A seqno below the first available one (deleted by retention) or otherwise unusable."""

    grpc_status = "OUT_OF_RANGE"


class LogTruncatedError(StorageError):
    """A :class:`~boomscooter.storage.LogReader` already returned records that the writer
    has since dropped (``truncate_after``: the file shrank, was replaced by a shortened copy
    or was deleted, or a notification announced less than was read). Those records were
    never committed; open a new reader at the committed position."""

    grpc_status = "ABORTED"


class LogClosedError(StorageError):
    """The log was closed, or failed on an earlier write and refuses further use."""

    grpc_status = "FAILED_PRECONDITION"


class LogLockedError(StorageError):
    """Another process holds the data directory's lock."""

    retriable = True
    grpc_status = "UNAVAILABLE"


class StorageIOError(StorageError):
    """A write, truncate or fsync failed (full disk, I/O error). After a failed fsync the
    page cache can no longer be trusted, so the log refuses further appends."""

    grpc_status = "UNAVAILABLE"


class ClientError(BoomscooterError):
    """Root of the errors the SDK (``Producer``, ``Subscriber``) raises to applications."""


class ServerUnavailableError(ClientError):
    """The server cannot be reached, or the connection was lost and retries ran out."""

    retriable = True
    grpc_status = "UNAVAILABLE"


class NotLeaderError(ClientError):
    """The node is not the leader; ``leader_address`` names the leader when known."""

    retriable = True
    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, leader_address: str = "") -> None:
        super().__init__(message)
        self.leader_address = leader_address


class ExpectedSeqnoError(ClientError):
    """A batch asserted a first seqno the log would not give it; nothing was appended.
    ``next_seqno`` is the seqno the log assigns next."""

    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, next_seqno: int) -> None:
        super().__init__(message)
        self.next_seqno = next_seqno


class RequestError(ClientError):
    """The server refused a request as malformed or too large (INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED, OUT_OF_RANGE and similar); ``code`` is the gRPC status name."""

    def __init__(self, message: str, *, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code
        self.grpc_status = code


class TrimmedError(ClientError, SeqnoOutOfRangeError):
    """The records a subscriber asked for were deleted by retention (below the first
    available seqno); ``first_seqno`` is where the log begins now."""

    def __init__(self, message: str, *, first_seqno: int) -> None:
        super().__init__(message)
        self.first_seqno = first_seqno
