"""A boomscooter node: the leader (and, later, replicas) — sans-I/O bookkeeping in
:mod:`~boomscooter.node.core`, the asyncio shell in :mod:`~boomscooter.node.leader`, the
rpc edge in :mod:`~boomscooter.node.servicer`, the multicast stream in
:mod:`~boomscooter.node.multicast`."""
