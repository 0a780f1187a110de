"""A node's duties beside the log stream: retention, and casting sealed segments.

Retention runs every ``retention_check_s`` on leaders and replicas alike (each applies the
same rules to its own log). With ``cast_listen``, a bootcast server offers the node's
*sealed* segments as ``/join/segments/<file>`` (the active segment still changes; the
``allow`` filter refuses it and anything else in the directory): a replica far behind, or
many at once, fetches whole segments through one multicast cast each.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from boomscooter.errors import ConfigError
from boomscooter.node.config import split_hostport
from bootcast import server as bserver
from bootcast.errors import ConfigError as BootcastConfigError
from bootcast.logs import get_logger

if TYPE_CHECKING:
    from boomscooter.node.runtime import Node

log = get_logger("boomscooter.node")

SEGMENT_PREFIX = "segments/"
_RETENTION_TASK = "retention"


def start(node: Node) -> None:
    config = node.config
    if config.retention_bytes is not None or config.retention_ms is not None:
        task = asyncio.get_running_loop().create_task(_retention_loop(node), name=_RETENTION_TASK)
        node.housekeeping_tasks.append(task)


def stop(node: Node) -> None:
    for task in node.housekeeping_tasks:
        task.cancel()
    node.housekeeping_tasks.clear()


async def _retention_loop(node: Node) -> None:
    while True:
        await asyncio.sleep(node.config.retention_check_s)
        try:
            await node.apply_retention()
        except Exception as exc:  # a failed deletion must not stop the node
            log.warning("node.retention_failed", error=str(exc))


async def start_segment_casts(node: Node) -> None:
    config = node.config
    assert config.cast_listen is not None
    host, port = split_hostport(config.cast_listen, "--cast-listen")
    try:
        serve = bserver.ServeConfig(
            root=Path(config.data_dir),
            host=host,
            port=port,
            interface=config.interface,
            ttl=config.ttl,
            page_size=config.page_size_bytes,  # the stream's page size fits this network too
            prehash_bytes=0,
            path_prefix=SEGMENT_PREFIX,
            allow=node.sealed_segment,
        )
        if config.rate_mbit > 0:
            serve = dataclasses.replace(serve, rate_mbit=config.rate_mbit)
        if config.cast_group is not None:  # ServeConfig checks it (a ConfigError on bad input)
            serve = dataclasses.replace(serve, group=config.cast_group)
        if config.cast_port_base is not None:
            serve = dataclasses.replace(serve, port_base=config.cast_port_base)
    except BootcastConfigError as exc:
        names = {"--group": "--cast-group", "--port-base": "--cast-port-base"}
        raise ConfigError(f"segment casts: {exc.renamed(names)}") from None
    node.cast_server, node.cast_runner, node.cast_port = await bserver.start_server(serve)
    if host in ("0.0.0.0", "::"):  # bound to any: name the host replicas reach us at
        host = node.address.rpartition(":")[0] or "127.0.0.1"
    node.cast_address = f"{host}:{node.cast_port}"
