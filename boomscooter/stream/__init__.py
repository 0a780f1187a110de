"""The log's multicast stream: wire format, encoder and receiver (sans-I/O).

The leader multicasts every stored batch once, as bootcast pages; replicas and subscribers
reassemble them, deliver batches in seqno order and ask their shell to repair losses with
a gRPC ``Fetch``. This docstring is the wire specification.

Wire format
-----------
A datagram is a bootcast page (:mod:`bootcast.page`): four big-endian u32 words — payload
``size``, page ``index`` (the encoder's own page sequence number from 1, wrapping from
0xFFFFFFFF to 1; informational), ``cast_id`` = the leader epoch, CRC32C of the payload —
then the payload, then the bootcast trailer ``BC 01 00 00`` (receivers ignore any bytes
after the payload). The payload is a 32-byte big-endian stream header and a fragment::

     0  1  magic         0xB7
     1  1  version       1
     2  1  kind          1 = BATCH_FRAGMENT, 2 = HEARTBEAT
     3  1  flags         0 (a receiver drops a page with unknown flags)
     4  8  seqno         fragment: the batch's base_seqno; heartbeat: the leader's last seqno
    12  8  commit_seqno  the leader's commit point when the page was sent
    20  4  record_count  fragment: records in the batch (>= 1); heartbeat: 0
    24  4  offset        fragment: where these bytes start in the batch; heartbeat: 0
    28  4  total_bytes   fragment: the batch's length (>= 48); heartbeat: 0
    32     fragment bytes (>= 1, within total_bytes); none in a heartbeat

A batch (the storage format of :mod:`boomscooter.storage`, byte for byte) goes out as
``ceil(length / (PAGESIZE - 32))`` consecutive pages with ascending offsets, all of one
epoch (the batch's own ``epoch`` field is never above it). Every fragment names its
batch's seqno range, so any one page tells a receiver which seqnos exist.

Theory of operation
-------------------
:class:`StreamEncoder` checks a batch's header, cuts it into pages and numbers them;
``heartbeat`` makes the page an idle leader sends periodically. :class:`StreamReceiver`
keeps ``next_seqno`` (first seqno not yet delivered) and reassembles fragments by
``(base_seqno, offset)``, dropping duplicates. A complete batch is validated in full
(storage CRC32C and framing, and agreement with its pages), then delivered if it starts
at ``next_seqno`` — followed by every buffered batch that now continues the log — or
buffered. Buffered bytes are bounded: data furthest ahead is evicted first (the batch at
``next_seqno`` always fits) and, once anything was refused, repair goes one hole at a
time, in order, so fetched batches are delivered rather than refused again.

Gaps are decided by evidence and time. Every page moves the *known end* (a fragment's
batch end, a heartbeat's last seqno + 1, the commit seqno + 1). A seqno known for
``reorder_window_s`` that is neither delivered, buffered nor in a batch whose first
fragment came less than ``reorder_window_s`` ago is missing: :class:`Gap` asks the
shell to Fetch it — a mid-stream discontinuity, tail loss behind a heartbeat and lost
fragments alike. A range is asked again only after ``repair_timeout_s``. Fetched batches
enter through ``repaired`` under the same ordering and dedupe rules, so a late multicast
copy and a fetched one are delivered once. ``next_deadline`` says when to call ``poll``.

Pages of an older epoch are dropped; the first page (or fetched batch) of a newer one
yields :class:`EpochChanged` and is dropped: the shell re-handshakes and starts a new
receiver. Malformed or foreign datagrams never raise: they are counted by :class:`Drop`
reason in ``drops``. A receiver started inside a batch delivers that whole batch first
(records before its ``next_seqno`` included); each later batch starts at the previous
``last_seqno + 1``.
"""

from __future__ import annotations

from boomscooter.stream.codec import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_PAGE_SIZE,
    MIN_PAGE_SIZE,
    STREAM_HEADER,
    STREAM_HEADER_BYTES,
    STREAM_MAGIC,
    STREAM_VERSION,
    Drop,
    Kind,
    StreamDropError,
    StreamEncodeError,
    StreamEncoder,
    StreamHeader,
    StreamPage,
    decode_page,
    encode_page,
)
from boomscooter.stream.receiver import (
    BatchReceived,
    CommitAdvanced,
    EpochChanged,
    Event,
    Gap,
    StreamReceiver,
)

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BUFFERED_BYTES",
    "DEFAULT_PAGE_SIZE",
    "MIN_PAGE_SIZE",
    "STREAM_HEADER",
    "STREAM_HEADER_BYTES",
    "STREAM_MAGIC",
    "STREAM_VERSION",
    "BatchReceived",
    "CommitAdvanced",
    "Drop",
    "EpochChanged",
    "Event",
    "Gap",
    "Kind",
    "StreamDropError",
    "StreamEncodeError",
    "StreamEncoder",
    "StreamHeader",
    "StreamPage",
    "StreamReceiver",
    "decode_page",
    "encode_page",
]
