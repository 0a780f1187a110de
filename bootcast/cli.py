"""The ``bootcast`` command: ``serve``, ``fetch`` and ``demo``.

``main()`` only parses arguments, configures logging and runs the async entry point.
Exit codes: 0 success (for fetch: a verified file), 1 failure (one line on stderr),
2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from . import logs
from .errors import BootcastError, ConfigError
from .joinreply import split_hostport

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _hostport(text: str) -> tuple[str, int]:
    try:
        host, port = split_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return host or "0.0.0.0", port


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = logs.log_options()
    parser = argparse.ArgumentParser(
        prog="bootcast",
        description="Multicast file casting: one transmission serves every client.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub, common)
    _add_fetch(sub, common)
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="serve a generated file on loopback and fetch it with several clients",
    )
    demo.add_argument("--clients", type=int, default=4, help="concurrent fetches (default 4)")
    demo.add_argument("--size-mib", type=int, default=32, help="file size (default 32 MiB)")
    return parser


Subparsers = Any  # argparse's _SubParsersAction (private in typeshed)


def _add_serve(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    from .defaults import (
        DEFAULT_GROUP_V4,
        DEFAULT_GROUP_V6,
        DEFAULT_PAGE_SIZE,
        DEFAULT_PORT_BASE,
        DEFAULT_RATE_MBIT,
    )

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="serve a directory: GET /join/<path> starts or joins a cast",
        description="Serve the files under --dir. The first GET /join/<path> starts a "
        "cast of that file; later joins attach to it; the cast stops when the last client "
        "leaves or after --idle-loops idle iterations.",
    )
    serve.add_argument("--dir", required=True, help="directory to serve")
    serve.add_argument(
        "--listen",
        type=_hostport,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="HTTP address (default 127.0.0.1:8080; port 0 picks a free port)",
    )
    serve.add_argument(
        "--group",
        help=f"first multicast group; casts use consecutive groups "
        f"(default {DEFAULT_GROUP_V4}, or {DEFAULT_GROUP_V6} on an IPv6 interface)",
    )
    serve.add_argument(
        "--port-base",
        type=int,
        default=DEFAULT_PORT_BASE,
        help=f"first UDP port; casts use consecutive ports (default {DEFAULT_PORT_BASE})",
    )
    serve.add_argument(
        "--page-size",
        type=int,
        default=DEFAULT_PAGE_SIZE,
        metavar="BYTES",
        help=f"payload bytes per page (default {DEFAULT_PAGE_SIZE}: one datagram fits a "
        "1500-byte MTU; up to 65487 where the path allows, e.g. 8192 on loopback)",
    )
    serve.add_argument(
        "--rate",
        type=_positive_float,
        default=DEFAULT_RATE_MBIT,
        metavar="MBIT",
        help=f"maximum send rate per cast in Mbit/s on the wire (default {DEFAULT_RATE_MBIT:g})",
    )
    _add_serve_sending(serve)


def _add_serve_sending(serve: argparse.ArgumentParser) -> None:
    from .defaults import (
        DEFAULT_IDLE_LOOPS,
    )

    serve.add_argument(
        "--no-adaptive",
        action="store_true",
        help="keep the rate fixed (no slowdown when clients report overruns or heavy loss)",
    )
    serve.add_argument(
        "--no-parity",
        action="store_true",
        help="repair by resending pages only (no parity symbols, even to clients that ask)",
    )
    serve.add_argument(
        "--interface",
        metavar="ADDR",
        help="send through this interface (address or name); default: the --listen "
        "address if it is a specific one, else the kernel's choice",
    )
    serve.add_argument(
        "--prehash-gib",
        type=float,
        default=16.0,
        metavar="GIB",
        help="at start, hash up to this much of --dir in the background so first joins "
        "answer at once (default 16; 0 = hash on first join only)",
    )
    serve.add_argument("--ttl", type=int, default=1, help="multicast TTL / hop limit (default 1)")
    serve.add_argument(
        "--idle-loops",
        type=int,
        default=DEFAULT_IDLE_LOOPS,
        metavar="N",
        help=f"stop a cast after N full iterations without a join, leave or NACK "
        f"(default {DEFAULT_IDLE_LOOPS})",
    )


def _add_fetch(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    fetch = sub.add_parser(
        "fetch",
        parents=[common],
        help="fetch a file from a bootcast server (like wget/curl)",
        description="Join the cast of URL, receive and repair, verify SIZE and SHA256, "
        "write the file atomically, leave. Exits 0 only for a verified file.",
    )
    fetch.add_argument("url", metavar="URL", help="join URL: http://HOST:PORT/join/PATH")
    fetch.add_argument(
        "-O",
        "--output",
        metavar="FILE",
        help="write to FILE ('-' for stdout); default: the URL's last path segment",
    )
    fetch.add_argument(
        "--interface",
        metavar="ADDR",
        help="receive on this interface (address or name); default: the one that reaches "
        "the server",
    )
    fetch.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="give up after S seconds without progress (default 30)",
    )
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress, errors only")
    fetch.add_argument(
        "--progress",
        choices=["auto", "bar", "log", "none"],
        default="auto",
        help="progress display (default auto: a bar on a TTY, log lines otherwise)",
    )
    fetch.add_argument(
        "--no-repair",
        action="store_true",
        help="never send NACKs; wait for the carousel like a spec-only client",
    )
    fetch.add_argument(
        "--no-parity",
        action="store_true",
        help="ask for lost pages themselves, not for parity symbols",
    )


async def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    from pathlib import Path

    from .server import ServeConfig, start_server

    host, port = args.listen
    config = ServeConfig(
        root=Path(args.dir),
        host=host,
        port=port,
        group=args.group,
        port_base=args.port_base,
        page_size=args.page_size,
        rate_mbit=args.rate,
        interface=args.interface,
        ttl=args.ttl,
        idle_loops=args.idle_loops,
        adaptive=not args.no_adaptive,
        parity=not args.no_parity,
        prehash_bytes=int(args.prehash_gib * 1024**3),
    )
    server, runner, bound_port = await start_server(config)
    log = logs.get_logger("bootcast.serve")
    log.info(
        "serve.listening",
        url=f"http://{f'[{host}]' if ':' in host else host}:{bound_port}/join/",
        host=host,
        port=bound_port,
        dir=str(config.root),
        group=config.base_group,
        page_size=config.page_size,
        rate_mbit=config.rate_mbit,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 60)
            if server.casts:
                log.info("serve.stats", casts=len(server.casts), **_flat(server.stats()))
    finally:
        log.info("serve.stopping", **_flat(server.stats()))
        await runner.cleanup()
    return 0


def _flat(stats: dict[str, float]) -> dict[str, float]:
    return {
        k.replace("bootcast_", "").replace("{", ".").replace("}", "").replace("=", "_"): v
        for k, v in stats.items()
        if v
    }


def _fetch(args: argparse.Namespace) -> int:
    from .client import FetchConfig, fetch

    # SIGTERM takes the Ctrl-C path, so the client leaves the cast on its way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    config = FetchConfig(
        url=args.url,
        output=args.output,
        interface=args.interface,
        timeout_s=args.timeout,
        progress="none" if args.quiet else args.progress,
        repair=not args.no_repair,
        parity=not args.no_parity,
    )
    result = fetch(config)
    if not args.quiet:
        logs.get_logger("bootcast.fetch").info(
            "fetch.verified",
            file=result.destination,
            size=result.size,
            sha256=result.sha256,
            seconds=round(result.seconds, 3),
            mbyte_per_s=round(result.mbyte_per_s, 1),
            repairs=result.repairs_received,
            nacks=result.nacks_sent,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = "warning" if getattr(args, "quiet", False) else getattr(args, "log_level", "info")
    logs.configure(json=getattr(args, "log_json", False), level=level)
    try:
        if args.command == "fetch":
            return _fetch(args)
        import asyncio

        if args.command == "demo":
            from .demo import run_demo

            return asyncio.run(run_demo(clients=args.clients, size_mib=args.size_mib))
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        print(f"bootcast {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"bootcast {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BootcastError as exc:
        print(f"bootcast {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"bootcast {args.command}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
