"""The boomscooter gRPC API, version 1 (package ``boomscooter.v1``).

The messages and the ``Boomscooter`` service are defined in
``proto/boomscooter/v1/boomscooter.proto``; the modules here are generated from it by
``scripts/gen_proto.py`` (pinned generator, committed output, checked for drift by
``tests/test_proto.py``) and must not be edited by hand:

* ``boomscooter_pb2`` — the messages and enums (typed by ``boomscooter_pb2.pyi``);
* ``boomscooter_pb2_grpc`` — ``BoomscooterStub`` (sync or ``grpc.aio`` channel),
  ``BoomscooterServicer`` and ``add_BoomscooterServicer_to_server``.

``serving`` is the one hand-written module: ``start_server`` builds a node's ``grpc.aio``
server with health checking and reflection. Nothing is imported here, so importing this
package costs nothing until a module is asked for. Protobuf messages stay at the rpc edge:
servicers convert them to and from the domain values of ``boomscooter``.
"""

__all__: list[str] = []
