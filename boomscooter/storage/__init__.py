"""boomscooter storage: a segmented, checksummed, crash-safe append-only log.

This docstring is the on-disk specification (format version 1); ``docs/storage-format.md``
repeats it for people who read the files directly. All integers are unsigned and
little-endian. CRC32C is the Castagnoli CRC (iSCSI polynomial, as in ``crc32c``).

Records and batches
-------------------
A record has a seqno (u64, contiguous from 1 across the whole log), a timestamp (ms since
the Unix epoch, u64), an optional channel (UTF-8 string), an optional key (bytes) and a
payload (bytes). Records are stored in batches — one producer batch is one stored batch
and one multicast payload — stamped with the leader epoch. A batch::

    offset size field
     0     4    length              total bytes of the batch, header included
     4     4    crc32c              CRC32C of bytes [0, 4) followed by bytes [8, length)
     8     1    magic               0xB5
     9     1    version             1
    10     2    attributes          bit 0: channel column present; bit 1: key column present;
                                    other bits 0 (a reader refuses unknown bits)
    12     4    record_count        n >= 1
    16     8    base_seqno          seqno of the first record; record i has base_seqno + i
    24     8    first_timestamp_ms  timestamp of the first record
    32     8    max_timestamp_ms    largest timestamp in the batch
    40     4    epoch               leader epoch that stamped the batch
    44     4    reserved            0
    48          columns:
                n x u64  timestamps
                n x u32  payload lengths
                n x u16  channel lengths, 0xFFFF = no channel   (only if attribute bit 0)
                n x u32  key lengths, 0xFFFFFFFF = no key       (only if attribute bit 1)
                channel bytes of records 0..n-1, concatenated  (only if attribute bit 0)
                key bytes of records 0..n-1, concatenated      (only if attribute bit 1)
                payload bytes of records 0..n-1, concatenated
                the columns end exactly at ``length``

Segment files
-------------
A log is a directory. Its records live in segment files named by the base seqno of their
first record, zero-padded to 20 digits: ``00000000000000000001.log``. Each starts with a
32-byte header, followed by batches back to back, the first with the segment's base seqno
and each next one continuing at the previous one's ``base_seqno + record_count``::

     0  8  magic     b"BOOMSEG\\n"
     8  2  version   1
    10  2  reserved  0
    12  4  crc32c    CRC32C of bytes [0, 12) followed by bytes [16, 32)
    16  8  base_seqno (must match the file name)
    24  8  reserved  0

The newest segment is *active* (appended to). A segment is *sealed* when the next one is
created; sealed segments are immutable (only retention deletes them, only
``truncate_after`` — a replica dropping a diverged tail — cuts into them again). A new
segment is started (rolled) before a batch that would take the active segment past
``segment_bytes``, or once ``segment_ms`` of wall-clock time have passed since the first
batch was appended to the active segment (after a restart, counted from the segment
file's modification time). Record timestamps play no part in rolling.

Index files (derived)
---------------------
Each sealed segment has ``<base>.index`` (sparse offsets) and ``<base>.timeindex``, written
when it is sealed. They are derived from the log and rebuilt whenever they are missing,
damaged, or disagree with it; the active segment's index exists in memory only. Both share
a 56-byte header::

     0  8  magic             b"BOOMIDX\\n" (offsets) or b"BOOMTIX\\n" (time)
     8  2  version           1
    10  2  reserved          0
    12  4  interval_bytes    an entry per this many bytes of log (at batch starts)
    16  8  base_seqno
    24  8  next_seqno        one past the segment's last seqno
    32  8  segment_bytes     size of the .log file this index describes
    40  8  max_timestamp_ms  largest record timestamp in the segment
    48  4  entry_count
    52  4  crc32c            CRC32C of bytes [0, 52) followed by all entries

then ``entry_count`` entries. Offset entry (8 bytes): seqno - base_seqno (u32), file
position of a batch (u32). Time entry (16 bytes): the largest timestamp of all records
stored before that position in the segment (u64, non-decreasing; 0 for the first), then
the same seqno and position. The first entry is always the first batch.

Other files: ``boomscooter.lock`` (held with ``flock`` by the writing process; readers do
not take it) and ``*.tmp`` (unfinished atomic writes, deleted on open).

Durability (fsync policy and ordering)
--------------------------------------
* ``always``: ``fdatasync`` of the active segment before an append returns. The batch
  joins the log only once that succeeded: a failed fsync cuts it back off the file and
  the log refuses further writes until it is reopened.
* ``interval``: a background thread ``fdatasync``\\ s soon after an unsynced append, at
  most once every ``interval_ms``; ``durable_seqno`` reports the highest synced seqno.
* ``never``: no fsync on the append or roll path.
* Roll: fdatasync the segment being sealed (not under ``never``), write its index files
  (temp + rename), write the new segment's header to ``<base>.log.tmp``, fdatasync, rename
  to ``<base>.log``, fsync the directory. Retention fsyncs the directory after deleting
  files. ``sync()`` and ``close()`` fsync under every policy. A new data directory is made
  durable by fsyncing its parent.
* ``truncate_after`` deletes the later segments newest first, fsyncing the directory
  after each (a crash never leaves a gap), then cuts the remaining segment: at a batch
  boundary with ``ftruncate`` and fdatasync; inside a batch by writing the segment's
  kept prefix and the shortened batch to ``<base>.log.tmp``, fdatasync, rename over
  ``<base>.log``, fsync the directory. A crash leaves the old log, the new one, or a
  prefix of the old one that still holds every kept record (repeat the truncation).
  (Directory fsyncs are skipped under ``never``.)

Recovery on open
----------------
* ``*.tmp`` files are deleted; files with other names are left alone (warning); index
  files without a segment are deleted.
* Segments must continue each other (no seqno gap), and each header must be valid.
* The active segment's unfinished header (a crash while creating it: empty, zeros or a
  prefix of the right header) is rewritten.
* A batch that fails its checks (length, magic/version, seqno continuity, CRC32C) starts a
  *torn tail* when no valid batch continuing the log follows it anywhere in the file. A
  torn tail of the active segment is truncated, with a ``segment.truncated`` warning that
  names the file and offset.
* Anything else — a bad batch in a sealed segment, a bad batch followed by valid ones,
  a damaged sealed header, a gap — is refused with :class:`CorruptLogError` naming the
  file and offset. ``repair=True`` (an explicit operator decision) truncates the log at
  that point instead, deleting all later segments.
* Every batch of every segment is CRC-checked (``verify_sealed=False`` checks only the
  active segment, trusting consistent sealed indexes after walking each sealed segment's
  tail; reads still check every batch they return).

Readers
-------
Batches are written with one ``pwrite`` each, and a file's size grows only after the
bytes are in the page cache, so a reader that stops at the last *complete* batch below the
size it was told (or saw) never uses a partial write: :class:`LogReader` does exactly that.
A notification ``(file, size)`` is the committed end of the log: earlier segments are
committed whole, later ones not at all, and a reader never reads past it. ``truncate_after``
may cut, replace or delete files under a reader; one that had already returned dropped
records gets :class:`~boomscooter.errors.LogTruncatedError` rather than stale bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from boomscooter.storage.api import (
    DEFAULT_READ_BYTES,
    FsyncMode,
    FsyncPolicy,
    Log,
    LogConfig,
    RecoveryAction,
    RecoveryKind,
    RecoveryReport,
)
from boomscooter.storage.batch import (
    Batch,
    BatchHeader,
    Entry,
    Record,
    encode_batch,
    split_batches,
)
from boomscooter.storage.log import SegmentedLog
from boomscooter.storage.memory import MemoryLog
from boomscooter.storage.reader import LogReader


def open_log(
    directory: str | os.PathLike[str],
    config: LogConfig | None = None,
    *,
    repair: bool = False,
    clock_ms: Callable[[], int] | None = None,
) -> SegmentedLog:
    """Open the log in ``directory`` (see :meth:`SegmentedLog.open`)."""
    return SegmentedLog.open(directory, config, repair=repair, clock_ms=clock_ms)


__all__ = [
    "DEFAULT_READ_BYTES",
    "Batch",
    "BatchHeader",
    "Entry",
    "FsyncMode",
    "FsyncPolicy",
    "Log",
    "LogConfig",
    "LogReader",
    "MemoryLog",
    "Record",
    "RecoveryAction",
    "RecoveryKind",
    "RecoveryReport",
    "SegmentedLog",
    "encode_batch",
    "open_log",
    "split_batches",
]
