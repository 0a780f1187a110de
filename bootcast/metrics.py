"""Counters of a bootcast server, kept with the Prometheus client library.

Each :class:`ServerMetrics` owns its registry (several servers can live in one process,
as in the tests); ``GET /metrics`` exposes it, and the server logs a snapshot as the
``serve.stats`` event.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pages_sent = Counter("bootcast_pages_sent", "Pages multicast (carousel)", registry=r)
        self.pages_resent = Counter("bootcast_pages_resent", "Pages resent for NACKs", registry=r)
        self.pages_repeated = Counter(
            "bootcast_pages_repeated",
            "Recent repairs repeated while the link was idle",
            registry=r,
        )
        self.parity_sent = Counter(
            "bootcast_parity_sent", "Parity symbols multicast (parity.py)", registry=r
        )
        self.bytes_sent = Counter("bootcast_bytes_sent", "Datagram bytes sent", registry=r)
        self.send_errors = Counter(
            "bootcast_send_errors", "Failed datagram sends", ["errno"], registry=r
        )
        self.nacks = Counter("bootcast_nacks_received", "NACK reports received", registry=r)
        self.nack_pages = Counter(
            "bootcast_nack_pages",
            "Pages asked for in NACKs, by outcome",
            ["outcome"],
            registry=r,
        )
        self.joins = Counter("bootcast_joins", "Joins accepted", registry=r)
        self.leaves = Counter("bootcast_leaves", "Leaves accepted", registry=r)
        self.casts_started = Counter("bootcast_casts_started", "Casts started", registry=r)
        self.casts_stopped = Counter(
            "bootcast_casts_stopped", "Casts stopped, by reason", ["reason"], registry=r
        )
        self.casts_active = Gauge("bootcast_casts_active", "Casts running", registry=r)
        self.clients_active = Gauge("bootcast_clients_active", "Clients joined", registry=r)
        self.http_rejected = Counter(
            "bootcast_http_rejected",
            "HTTP requests answered with an error",
            ["status"],
            registry=r,
        )
        self.rate_changes = Counter(
            "bootcast_rate_changes", "Adaptive pacing changes", ["reason"], registry=r
        )

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def snapshot(self) -> dict[str, float]:
        """Flat name → value of every sample (for logs and tests)."""
        out: dict[str, float] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out
