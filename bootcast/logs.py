"""Logging for both packages: the one entry point (:func:`get_logger`) every module of
bootcast and boomscooter takes its logger from, and the command-line tools' configuration.

Event names are dotted (``cast.started``); context is bound, not formatted in.

- A command-line tool calls :func:`configure` (``--log-json``, ``--log-level``): human-readable
  on a TTY (colours) and plain ``key=value`` lines otherwise, one JSON object per line with
  ``--log-json``; always to stderr, so ``bootcast fetch -O -`` keeps stdout for the file.
- A program that uses the SDK (or a server) as a library and never calls :func:`configure`
  keeps its own structlog configuration: events go to ``structlog.get_logger(name)`` as the
  program configured it, and nothing here changes structlog's global settings.

structlog is imported on the first event that passes the level filter: ``bootcast fetch
--quiet`` on a rack of machines starting at once then never pays for the import.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

# The stdlib logging levels, as numbers: importing logging costs a quiet fetch 15 ms.
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
_METHOD_LEVELS = {
    "debug": DEBUG,
    "info": INFO,
    "warning": WARNING,
    "warn": WARNING,
    "error": ERROR,
    "exception": ERROR,
    "critical": CRITICAL,
}
_settings: dict[str, Any] = {"json": False, "level": INFO, "applied": False, "owned": False}


def configure(*, json: bool = False, level: str = "info") -> None:
    """Take over structlog's configuration (the command-line tools do, once, at start)."""
    _settings.update(json=json, level=LEVELS[level], applied=False, owned=True)


def reset() -> None:
    """Forget :func:`configure`: back to library mode (structlog as the program configured
    it). For a test process, where tools' ``main()`` run in-process beside tests that
    capture events through structlog."""
    _settings.update(json=False, level=INFO, applied=False, owned=False)


def log_options() -> argparse.ArgumentParser:
    """The ``--log-json`` / ``--log-level`` options of both tools, as an argparse parent
    for the top-level parser and every sub-command's. SUPPRESS defaults: a sub-command's
    parser must not reset what was given before the command."""
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log one JSON object per line",
    )
    common.add_argument(
        "--log-level", choices=sorted(LEVELS), default=argparse.SUPPRESS, help="default: info"
    )
    return common


def configure_now(*, json: bool = False, level: str = "info") -> None:
    """``configure`` and apply at once (for programs that log through structlog directly)."""
    configure(json=json, level=level)
    _apply()


def quiet_aiohttp() -> None:
    """aiohttp reports malformed requests through stdlib logging; the server counts and logs
    them itself (``http.rejected``), so keep its tracebacks out of the operator's way."""
    import logging

    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL)


def _apply() -> Any:
    import structlog

    if not _settings["applied"]:
        processors: list[Any] = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ]
        renderer: Any
        if _settings["json"]:
            processors.append(structlog.processors.dict_tracebacks)
            renderer = structlog.processors.JSONRenderer()
        else:
            renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        structlog.configure(
            processors=[*processors, renderer],
            wrapper_class=structlog.make_filtering_bound_logger(_settings["level"]),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=False,
        )
        _settings["applied"] = True
    return structlog


class _LazyLogger:
    """A structlog-like logger that imports structlog only for events it will emit."""

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}

    def bind(self, **context: Any) -> _LazyLogger:
        return _LazyLogger(self._name, {**self._context, **context})

    def __getattr__(self, method: str) -> Any:
        level = _METHOD_LEVELS.get(method)
        if level is None:
            raise AttributeError(method)

        def emit(event: str, **fields: Any) -> None:
            if not _settings["owned"]:  # a library in someone's program: their structlog
                import structlog
            elif level < _settings["level"]:
                return
            else:
                structlog = _apply()
            logger = structlog.get_logger(self._name).bind(**self._context)
            getattr(logger, method)(event, **fields)

        return emit


def get_logger(name: str) -> Any:
    return _LazyLogger(name)
