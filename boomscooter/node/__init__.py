"""A boomscooter node, leader or replica: its rules (:mod:`~boomscooter.node.rules`) and
state machine (:mod:`~boomscooter.node.machine`) without I/O; the asyncio runtime that
carries out the machine's commands (:mod:`~boomscooter.node.runtime`), with a replica's
follower (:mod:`~boomscooter.node.follower`), calls to other nodes
(:mod:`~boomscooter.node.peers`), the rpc edge (:mod:`~boomscooter.node.servicer`,
:mod:`~boomscooter.node.replicate`) and the multicast stream
(:mod:`~boomscooter.node.multicast`). ``docs/architecture.md`` draws the layers."""
