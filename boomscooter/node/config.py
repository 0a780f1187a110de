"""A node's configuration and the values its shell and rpc edge exchange (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from boomscooter.errors import ConfigError
from boomscooter.node.core import Appended
from boomscooter.node.multicast import split_group
from boomscooter.storage import Entry, FsyncMode, FsyncPolicy
from boomscooter.stream import DEFAULT_PAGE_SIZE, MIN_PAGE_SIZE
from bootcast import joinreply

DEFAULT_GROUP = "239.255.66.1:7600"
DEFAULT_MAX_BATCH_BYTES = 16 << 20
GRPC_MESSAGE_BYTES = DEFAULT_MAX_BATCH_BYTES + (1 << 20)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    data_dir: str
    listen: str = "127.0.0.1:0"
    group: str = DEFAULT_GROUP
    interface: str | None = None
    cast_listen: str | None = None
    cast_group: str | None = None  # base multicast group of the segment casts (bootcast's)
    cast_port_base: int | None = None  # their first UDP port (bootcast's default)
    min_insync: int = 1
    fsync: FsyncPolicy = field(default_factory=FsyncPolicy)
    page_size_bytes: int = DEFAULT_PAGE_SIZE
    rate_mbit: float = 0.0
    ttl: int = 1
    heartbeat_ms: int = 100
    segment_bytes: int = 256 << 20
    retention_bytes: int | None = None  # delete the oldest sealed segments above this
    retention_ms: int | None = None  # delete sealed segments whose newest record is older
    retention_check_s: float = 10.0
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    node_id: str | None = None  # the node's name (default: its advertised address)
    advertise: str | None = None  # the gRPC address others should use (default: bound)
    follow: str | None = None  # start as a replica of the leader at this HOST:PORT
    insync_timeout_s: float = 5.0  # a replica silent this long leaves the in-sync set
    leader_timeout_s: float = 2.0  # a leader silent this long is presumed lost (replica)

    def __post_init__(self) -> None:
        if not MIN_PAGE_SIZE <= self.page_size_bytes <= 65000:
            raise ConfigError(f"--page-size must be in [{MIN_PAGE_SIZE}, 65000]")
        if self.rate_mbit < 0:
            raise ConfigError("--rate must not be negative (0 = unpaced)")
        if not 10 <= self.heartbeat_ms <= 60_000:
            raise ConfigError("--heartbeat-ms must be in [10, 60000]")
        if not 60 <= self.max_batch_bytes <= DEFAULT_MAX_BATCH_BYTES:
            raise ConfigError(f"--max-batch-bytes must be in [60, {DEFAULT_MAX_BATCH_BYTES}]")
        try:
            split_group(self.group, 7600)
        except ValueError as exc:
            raise ConfigError(f"--group: {exc}") from None
        split_hostport(self.listen, "--listen")
        if self.cast_listen is not None:
            split_hostport(self.cast_listen, "--cast-listen")
        if self.follow is not None:
            split_hostport(self.follow, "--leader")
        if not 0.1 <= self.insync_timeout_s <= 3600:
            raise ConfigError("--insync-timeout must be in [0.1, 3600] s")
        if not 1.0 <= self.leader_timeout_s <= 3600:
            raise ConfigError("--leader-timeout must be in [1, 3600] s")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProduceBatch:
    """A producer's batch as the servicer hands it over (no protobuf here)."""

    producer_id: str
    batch_sequence: int
    expected_first_seqno: int | None
    encoded: bytes | None = None
    entries: Sequence[Entry] | None = None


@dataclass(frozen=True, slots=True)
class ProduceOutcome:
    appended: Appended
    duplicate: bool


def split_hostport(text: str, what: str = "address") -> tuple[str, int]:
    """bootcast's ``HOST:PORT`` parser, its errors as ConfigError; an empty host is any."""
    try:
        host, port = joinreply.split_hostport(text)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return host or "0.0.0.0", port


def storage_fsync(policy: FsyncPolicy) -> FsyncPolicy:
    """The storage policy behind a node's ``--fsync``. ``always`` is *group commit*: appends
    go to the page cache and the syncer thread fdatasyncs whatever is unsynced, back to back
    (one fdatasync covers every batch appended meanwhile); nothing counts — for the commit,
    a replica's ack or an ``acks=leader`` answer — before its fdatasync returned. Same
    promise as one fdatasync per append, at a fraction of the fdatasyncs under load."""
    if policy.mode is FsyncMode.ALWAYS:
        return FsyncPolicy(mode=FsyncMode.INTERVAL, interval_ms=1)
    return policy
