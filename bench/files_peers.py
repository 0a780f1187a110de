"""The peers of :mod:`bench.files_bench`: one runner per file-distribution tool, each in its
own module, and the table the bench picks them from.

Each runner takes a :class:`bench.files_harness.RunSpec` (a built
:class:`bench.netns.Topology`, the source file, one output path per client, a log directory
and a timeout) and returns a :class:`bench.files_harness.Outcome`: the measured wall time,
or ``None`` when the run failed or timed out, and a note. The driver injects loss, verifies
the copies and tabulates the results.

The peers (their command lines, and where each one's clock starts and stops, are in their
modules; servers are started and made ready before the clock starts):

* http (:mod:`bench.peer_http`): unicast baseline, one TCP download per client. nginx
  (``sendfile``, one worker) if installed, else ``python -m http.server``; the clients are
  ``curl -sSf``;
* udpcast (:mod:`bench.peer_udpcast`): ``udp-sender`` multicasts the file in slices, each
  acknowledged by every receiver;
* uftp (:mod:`bench.peer_uftp`): a multicast sender with NAK-based repair to a closed group
  of daemons;
* bootcast (:mod:`bench.peer_bootcast`): this project; clients join over HTTP and receive
  the multicast carousel.

The configurations were tuned on this topology; see the comments at each command line.
Every server process (nginx, udp-sender, uftp, bootcast serve) runs at
:data:`bench.processes.SERVER_NICE`.
"""

from __future__ import annotations

from collections.abc import Callable

from bench import peer_bootcast, peer_http, peer_udpcast, peer_uftp
from bench.files_harness import Outcome, RunSpec

PEERS: dict[str, Callable[[RunSpec], Outcome]] = {
    "http": peer_http.run_http,
    "udpcast": peer_udpcast.run_udpcast,
    "uftp": peer_uftp.run_uftp,
    "bootcast": peer_bootcast.run_bootcast,
}
TOOLS: dict[str, tuple[str, ...]] = {
    "http": peer_http.TOOLS,
    "udpcast": peer_udpcast.TOOLS,
    "uftp": peer_uftp.TOOLS,
    "bootcast": peer_bootcast.TOOLS,
}
"""The executables each peer needs on ``PATH`` (a row is skipped without them)."""
