"""The ``boomscooter`` command: ``leader``, ``produce``, ``subscribe``, ``status``, ``demo``.

``main()`` parses arguments, configures logging (structlog: human on a TTY, JSON with
``--log-json``, always on stderr) and runs the command (:mod:`boomscooter.commands`).
Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from boomscooter import loops
from boomscooter.errors import BoomscooterError, ConfigError
from bootcast import logs

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _start(text: str) -> int | str:
    if text in ("earliest", "latest"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--from takes a seqno, earliest or latest, not {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError("a seqno is at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = logs.log_options()
    parser = argparse.ArgumentParser(
        prog="boomscooter",
        description="A replicated append-only log: the leader multicasts each batch once.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_nodes(sub, common, _node_options())
    _add_promote(sub, common)
    _add_produce(sub, common)
    _add_subscribe(sub, common)
    _add_status_and_demo(sub, common)
    return parser


Subparsers = Any  # argparse's _SubParsersAction (private in typeshed)


def _node_options() -> argparse.ArgumentParser:
    """The options of ``leader`` and ``replica``."""
    from boomscooter.node.config import DEFAULT_GROUP

    node = argparse.ArgumentParser(add_help=False)  # options of leader and replica
    node.add_argument("--data-dir", required=True, help="the log's directory")
    node.add_argument(
        "--listen",
        default="127.0.0.1:7700",
        help="gRPC HOST:PORT (port 0: any; default %(default)s)",
    )
    node.add_argument(
        "--group",
        default=DEFAULT_GROUP,
        help="multicast ADDR:PORT of the stream this node sends while it leads "
        "(default %(default)s)",
    )
    node.add_argument("--interface", help="interface (address or name) to multicast on")
    node.add_argument(
        "--cast-listen",
        help="HOST:PORT of a bootcast server casting sealed segments (/join/segments/<file>)",
    )
    node.add_argument(
        "--cast-group",
        help="base multicast group of the segment casts (one group per concurrent cast; "
        "default: bootcast's 239.255.66.1) — give each log on a network its own",
    )
    node.add_argument(
        "--cast-port-base", type=_positive_int, help="first UDP port of the segment casts"
    )
    node.add_argument(
        "--min-insync",
        type=_positive_int,
        default=1,
        help="durable copies (the leader's included) that commit a batch (default 1; a "
        "replica takes its leader's setting when promoted)",
    )
    node.add_argument(
        "--fsync",
        default="interval",
        help="always | interval[:MS] | never (default interval, 100 ms)",
    )
    _node_storage_options(node)
    return node


def _node_storage_options(node: argparse.ArgumentParser) -> None:
    from boomscooter.stream import DEFAULT_PAGE_SIZE

    node.add_argument(
        "--page-size",
        type=_positive_int,
        default=DEFAULT_PAGE_SIZE,
        help="bytes per multicast page (default %(default)s: one Ethernet frame; up to "
        "65000 on loopback or jumbo frames)",
    )
    node.add_argument(
        "--rate", type=float, default=0.0, help="multicast rate limit in Mbit/s (0: unpaced)"
    )
    node.add_argument("--ttl", type=int, default=1, help="multicast TTL (default 1)")
    node.add_argument("--heartbeat-ms", type=int, default=100, help="idle heartbeat period")
    node.add_argument(
        "--segment-bytes", type=_positive_int, default=256 << 20, help="roll segments at this size"
    )
    node.add_argument(
        "--retention-bytes", type=_positive_int, help="keep at most this much log (whole segments)"
    )
    node.add_argument(
        "--retention-hours", type=float, help="delete segments whose records are older"
    )
    node.add_argument("--advertise", help="gRPC address others should use (default: bound)")
    node.add_argument("--node-id", help="this node's name (default: its gRPC address)")
    node.add_argument(
        "--insync-timeout",
        type=float,
        default=5.0,
        help="seconds without an ack before a replica leaves the in-sync set (default 5)",
    )
    node.add_argument(
        "--leader-timeout",
        type=float,
        default=2.0,
        help="seconds without a word from its leader before a replica presumes it lost and "
        "asks its peers who leads (default 2; the leader speaks every 0.5 s)",
    )


def _add_nodes(
    sub: Subparsers, common: argparse.ArgumentParser, node: argparse.ArgumentParser
) -> None:
    sub.add_parser(
        "leader",
        parents=[common, node],
        help="run a leader: sequence, store and multicast producers' batches",
        description="Run the leader of a log stored in --data-dir (created if missing, "
        "recovered if it exists). Serves the gRPC API on --listen and multicasts every "
        "batch once on --group. If a peer it knows leads with a higher epoch (it was "
        "failed over), it follows that leader as a replica instead. Stops cleanly on "
        "SIGTERM or Ctrl-C.",
    )
    replica = sub.add_parser(
        "replica",
        parents=[common, node],
        help="run a replica: follow a leader's stream into a local copy of the log",
        description="Run a replica of the log led by --leader: it receives the leader's "
        "multicast stream (the same pages subscribers get), stores and fsyncs every batch "
        "and acknowledges its durable seqno; repairs loss with Fetch, catches up on whole "
        "sealed segments through the leader's bootcast casts, and serves subscribers from "
        "its own copy. `boomscooter promote --server` makes it the leader.",
    )
    replica.add_argument("--leader", required=True, help="the leader's gRPC HOST:PORT")


def _add_promote(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    promote = sub.add_parser(
        "promote",
        parents=[common],
        help="manual failover: make a replica the leader",
        description="Make the replica at --server the leader with a new epoch. It first "
        "copies from the other replicas any record they hold that it lacks (so every "
        "record acknowledged at quorum survives), then leads; the old leader, when it "
        "returns, sees the higher epoch and follows as a replica.",
    )
    promote.add_argument("--server", required=True, help="the replica's HOST:PORT")
    promote.add_argument(
        "--min-insync",
        type=_positive_int,
        help="copies that commit from now on (default: as before)",
    )
    promote.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    promote.add_argument(
        "--force",
        action="store_true",
        help="promote even though the current leader still answers (a planned switchover; "
        "records it commits before it notices the new epoch may be lost)",
    )


def _add_produce(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    produce = sub.add_parser(
        "produce",
        parents=[common],
        help="append stdin lines as records",
        description="Read lines from stdin; each line (without its newline) becomes one "
        "record's payload. Prints a summary on stderr; exits 0 once every record is "
        "acknowledged at --acks.",
    )
    produce.add_argument("--server", required=True, help="the leader's HOST:PORT")
    produce.add_argument("--acks", choices=("none", "leader", "quorum"), default="leader")
    produce.add_argument("--channel", help="channel of every record")
    produce.add_argument("--linger-ms", type=float, default=5.0, help="batching delay")
    produce.add_argument(
        "--batch-records", type=_positive_int, default=10_000, help="records per batch at most"
    )
    produce.add_argument("--quiet", action="store_true", help="no summary")


def _add_subscribe(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    subscribe = sub.add_parser(
        "subscribe",
        parents=[common],
        help="print committed records",
        description="Print committed records in seqno order, exactly once: the payload as a "
        "line (raw bytes), or with --json one object per line with seqno, timestamp, "
        "channel, key_b64, payload (UTF-8 text or null) and payload_b64.",
    )
    subscribe.add_argument("--server", required=True, help="a node's HOST:PORT")
    subscribe.add_argument(
        "--from", dest="start", type=_start, default="latest", help="SEQNO | earliest | latest"
    )
    subscribe.add_argument(
        "--from-time", type=int, metavar="MS", help="start at the first record at or after "
        "this time (ms since the Unix epoch)"
    )  # fmt: skip
    end = subscribe.add_mutually_exclusive_group()
    end.add_argument("--count", type=_positive_int, help="stop after N records")
    end.add_argument("--until", type=_positive_int, help="stop after this seqno")
    subscribe.add_argument("--channel", help="only channels starting with this prefix")
    subscribe.add_argument(
        "--mode", choices=("multicast", "unicast", "notifications"), default="multicast"
    )
    subscribe.add_argument("--interface", help="interface (address or name) to join on")
    subscribe.add_argument(
        "--data-dir", help="notifications mode: the log directory as mounted here"
    )
    subscribe.add_argument("--json", action="store_true", help="one JSON object per record")
    subscribe.add_argument(
        "--timeout", type=float, default=30.0, help="give up on a lost server after S seconds"
    )


def _add_status_and_demo(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common], help="a node's role, seqnos, replicas")
    status.add_argument("--server", required=True, help="a node's HOST:PORT")
    status.add_argument("--json", action="store_true", help="as one JSON object")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="an embedded leader on loopback with producers and subscribers (finite)",
        description="Starts a leader on loopback with a temporary data directory, two "
        "producers, and subscribers in all three modes plus the direct-file reader; checks "
        "that every record arrived exactly once, in order; prints a summary; exits 0 only "
        "if every check passed.",
    )
    demo.add_argument("--records", type=_positive_int, default=100_000, help="records in all")


async def interruptible(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command; SIGINT or SIGTERM cancels it (its ``finally`` and ``async with``
    blocks run: a producer closes its stream) and it ends as KeyboardInterrupt (exit 130).
    The leader handles both signals itself (a clean stop, exit 0)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signalled = False

    def cancel() -> None:
        nonlocal signalled
        if signalled:  # a second signal: do not wait for a clean end any more
            os._exit(EXIT_INTERRUPTED)
        signalled = True
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, cancel)
    try:
        return await coro
    except asyncio.CancelledError:
        if signalled:
            raise KeyboardInterrupt from None
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The demo prints its own summary: only warnings unless asked for more.
    default_level = "warning" if args.command == "demo" else "info"
    level = getattr(args, "log_level", default_level)
    logs.configure_now(json=getattr(args, "log_json", False), level=level)
    from boomscooter import commands

    runners = {
        "leader": commands.run_leader,
        "replica": commands.run_leader,
        "promote": commands.run_promote,
        "produce": commands.run_produce,
        "subscribe": commands.run_subscribe,
        "status": commands.run_status,
        "demo": commands.run_demo,
    }
    try:
        command = runners[args.command](args)
        if args.command not in ("leader", "replica"):
            command = interruptible(command)
        return loops.run(command)
    except KeyboardInterrupt:
        print(f"boomscooter {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"boomscooter {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BoomscooterError as exc:
        print(f"boomscooter {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"boomscooter {args.command}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
