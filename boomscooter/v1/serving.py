"""The gRPC server of a boomscooter node: the API, health checking and reflection.

:func:`start_server` is the one factory: it registers a ``BoomscooterServicer`` (a thin
subclass that converts pb ↔ domain values), the standard ``grpc.health.v1.Health`` service
(the overall status ``""`` and ``boomscooter.v1.Boomscooter`` report ``SERVING`` once the
server runs) and server reflection (so ``grpcurl``-style tools can list and call the API),
binds, starts, and returns ``(server, port)`` so tests and ``--listen HOST:0`` get the bound
port. Stop it with ``await server.stop(grace_s)``; ``await
health_servicer.enter_graceful_shutdown()`` first tells health checkers (NOT_SERVING) before
the grace period.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]

from boomscooter.v1 import boomscooter_pb2, boomscooter_pb2_grpc

SERVICE_NAME: str = boomscooter_pb2.DESCRIPTOR.services_by_name["Boomscooter"].full_name
HEALTH_SERVICE_NAME: str = health.SERVICE_NAME
REFLECTION_SERVICE_NAME: str = reflection.SERVICE_NAME

__all__ = ["HEALTH_SERVICE_NAME", "REFLECTION_SERVICE_NAME", "SERVICE_NAME", "start_server"]


async def start_server(
    servicer: boomscooter_pb2_grpc.BoomscooterServicer,
    *,
    listen: str = "127.0.0.1:0",
    health_servicer: Any = None,
    options: Sequence[tuple[str, Any]] = (),
) -> tuple[grpc.aio.Server, int]:
    """Serve ``servicer`` on ``listen`` ("HOST:PORT", port 0 picks one); returns the
    running server and its bound port.

    ``health_servicer`` is a ``grpc_health.v1.health.aio.HealthServicer`` the caller keeps
    to change the status later (one is made when omitted); ``options`` are gRPC channel
    arguments, e.g. ``("grpc.max_receive_message_length", n)`` for large batches.
    """
    server = grpc.aio.server(options=list(options))
    boomscooter_pb2_grpc.add_BoomscooterServicer_to_server(servicer, server)
    if health_servicer is None:
        health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
        raise OSError(f"cannot listen on {listen}: {exc}") from exc
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set(SERVICE_NAME, serving)
    await server.start()
    return server, port
