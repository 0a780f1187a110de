"""What the tests share: waiting on conditions (``waiting``), loopback ports and seeded
multicast groups (``net``), the one wrapper for node processes (``process``), and helpers per
subject (bootcast's HTTP side, the leader's RPCs, logs, storage, replication clusters on
loopback and in network namespaces, the replication simulation, the spec-only client)."""
