"""The nodes a client may talk to: ``"host:port"`` or several, comma-separated.

The client talks to one node at a time. When that node cannot be reached it moves to the
next in the list (the leader died: a replica answers, and its NOT_LEADER answer names the
leader — or, after a promotion, the new leader); a redirect moves it to the named node,
which need not be in the list.
"""

from __future__ import annotations

import grpc

from boomscooter.errors import ConfigError
from boomscooter.v1 import boomscooter_pb2, boomscooter_pb2_grpc


class ServerList:
    def __init__(self, text: str) -> None:
        self.servers = [a.strip() for a in text.split(",") if a.strip()]
        if not self.servers:
            raise ConfigError(f"no server address in {text!r} (want host:port[,host:port...])")
        self.current = self.servers[0]

    def rotate(self) -> bool:
        """Move to the next listed node; False when there is no other one."""
        if len(self.servers) < 2:
            return False
        at = self.servers.index(self.current) if self.current in self.servers else -1
        self.current = self.servers[(at + 1) % len(self.servers)]
        return True


async def ask_leader(channel: grpc.aio.Channel) -> str | None:
    """The leader's address as the node behind ``channel`` knows it (its Status)."""
    try:
        stub = boomscooter_pb2_grpc.BoomscooterStub(channel)
        status = await stub.Status(boomscooter_pb2.StatusRequest(), timeout=5.0)
    except grpc.aio.AioRpcError:
        return None
    return status.leader_address or None
