"""A node's small persistent state, ``node.json`` in the data directory.

``{"epoch": N, "peers": ["host:port", ...], "leader": "host:port"}``: the highest epoch
the node has taken or seen and who led it (a leader takes a new epoch at every start, a
promoted replica one above all it knows; a replica never follows an older epoch, nor a
second leader under the epoch it knows), and the gRPC addresses of the other nodes of the
log (a restarted leader asks them whether someone leads with a higher epoch before it
accepts a write: fencing). Written atomically (temp file, fsync, rename, directory
fsync); a missing file is a new node.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field

from boomscooter.errors import StorageError
from boomscooter.node import rules
from boomscooter.storage.segment import fsync_dir

FILE_NAME = "node.json"


@dataclass(slots=True)
class NodeState:
    epoch: int = 0
    peers: list[str] = field(default_factory=list)
    leader: str = ""  # who led at ``epoch`` (this node's own address when it did)


def load_state(data_dir: str) -> NodeState:
    path = os.path.join(data_dir, FILE_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return NodeState()
    except (OSError, ValueError) as exc:
        raise StorageError(f"{path}: unreadable node state: {exc}") from exc
    if not isinstance(raw, dict):
        raise StorageError(f"{path}: node state is not a JSON object")
    epoch, peers, leader = raw.get("epoch", 0), raw.get("peers", []), raw.get("leader", "")
    if (
        not isinstance(epoch, int)
        or epoch < 0
        or not isinstance(peers, list)
        or not isinstance(leader, str)
    ):
        raise StorageError(f"{path}: malformed node state")
    return NodeState(epoch, [p for p in peers if isinstance(p, str)], leader)


_save_lock = threading.Lock()
_written: dict[str, int] = {}  # data dir -> version of the snapshot last written
_versions = itertools.count(1)  # one sequence for every node of the process (restarts too)


def next_version() -> int:
    """A number above every earlier one: a snapshot's place among all saves."""
    return next(_versions)


def save_state(data_dir: str, state: NodeState, version: int = 0) -> None:
    """Write ``node.json`` atomically. Saves are serialized (callers run it on executor
    threads; two at once must not interleave in one temp file), and each uses a temp file
    of its own, so a file is always one whole state. ``version`` orders snapshots of one
    node's state: one older than the last written is skipped (two executor threads may run
    saves in another order than they were made; an older epoch must never land last)."""
    path = os.path.join(data_dir, FILE_NAME)
    data = json.dumps(
        {"epoch": state.epoch, "peers": sorted(set(state.peers)), "leader": state.leader}
    ).encode()
    with _save_lock:
        if version:
            if not rules.newer_snapshot(version, _written.get(data_dir, 0)):
                return
            _written[data_dir] = version
        fd, temp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=data_dir)
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        fsync_dir(data_dir)
