"""The gRPC API: generated code in step with the .proto, messages round-trip, and a real
grpc.aio server answers the API, health checking and reflection."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import (  # type: ignore[import-untyped]
    reflection_pb2,
    reflection_pb2_grpc,
)

from boomscooter.storage import Entry, encode_batch, split_batches
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc
from boomscooter.v1.serving import HEALTH_SERVICE_NAME, SERVICE_NAME, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_proto.py"
PACKAGE_DIR = REPO_ROOT / "boomscooter" / "v1"
PROTO_FILE = REPO_ROOT / "proto" / "boomscooter" / "v1" / "boomscooter.proto"

# The RPC names are a contract (DESIGN.md §3.2): name -> (client streams, server streams).
CONTRACT_RPCS = {
    "Produce": (True, True),
    "Handshake": (False, False),
    "Subscribe": (False, True),
    "Notifications": (False, True),
    "Fetch": (False, False),
    "Replicate": (True, True),
    "Status": (False, False),
}
# Extensions beyond the contract (DESIGN.md §3.2 allows adding, never changing).
EXTENSION_RPCS = {"Promote": (False, False), "Fence": (False, False)}


def _generated(root: Path) -> set[str]:
    return {p.name for p in (root / "boomscooter" / "v1").glob("*_pb2*.py*")}


def test_generated_code_has_not_drifted(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, f"scripts/gen_proto.py failed:\n{run.stderr}"
    fresh = _generated(tmp_path)
    committed = _generated(REPO_ROOT)
    assert fresh == {
        "boomscooter_pb2.py",
        "boomscooter_pb2.pyi",
        "boomscooter_pb2_grpc.py",
        "boomscooter_pb2_grpc.pyi",
    }
    fix = "run `.venv/bin/python scripts/gen_proto.py` and commit boomscooter/v1/"
    assert committed == fresh, f"generated files differ in name from the .proto's: {fix}"
    _, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "boomscooter" / "v1", PACKAGE_DIR, sorted(fresh), shallow=False
    )
    assert not mismatch and not errors, f"stale generated code {mismatch + errors}: {fix}"


def test_service_has_the_contract_rpcs() -> None:
    service = pb.DESCRIPTOR.services_by_name["Boomscooter"]
    assert service.full_name == SERVICE_NAME == "boomscooter.v1.Boomscooter"
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert kinds == CONTRACT_RPCS | EXTENSION_RPCS
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


def _comment_paths(proto: descriptor_pb2.FileDescriptorProto) -> set[tuple[int, ...]]:
    return {
        tuple(loc.path)
        for loc in proto.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }


def test_every_declaration_is_commented(tmp_path: Path) -> None:
    """Messages, fields, oneofs, enums, enum values, the service and its RPCs all carry a
    comment (they become the docstrings of the typed stubs)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    out = tmp_path / "descriptor.pb"
    rc = protoc.main(
        [
            "protoc",
            f"-I{REPO_ROOT / 'proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            str(PROTO_FILE.relative_to(REPO_ROOT / "proto")),
        ]
    )
    assert rc == 0
    (proto,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    commented = _comment_paths(proto)
    # Field numbers of FileDescriptorProto / DescriptorProto / EnumDescriptorProto etc.
    missing = []
    for i, message in enumerate(proto.message_type):
        if (4, i) not in commented:
            missing.append(message.name)
        missing += [
            f"{message.name}.{f.name}"
            for j, f in enumerate(message.field)
            if (4, i, 2, j) not in commented
        ]
        missing += [
            f"{message.name}.{o.name}"
            for j, o in enumerate(message.oneof_decl)
            if not o.name.startswith("_") and (4, i, 8, j) not in commented
        ]
    for i, enum in enumerate(proto.enum_type):
        if (5, i) not in commented:
            missing.append(enum.name)
        missing += [
            f"{enum.name}.{v.name}"
            for j, v in enumerate(enum.value)
            if (5, i, 2, j) not in commented
        ]
    for i, service in enumerate(proto.service):
        if (6, i) not in commented:
            missing.append(service.name)
        missing += [
            f"{service.name}.{m.name}"
            for j, m in enumerate(service.method)
            if (6, i, 2, j) not in commented
        ]
    assert not missing, f"declarations without a comment: {missing}"


def _batch_bytes(base_seqno: int, count: int) -> bytes:
    entries = [
        Entry(timestamp_ms=1_700_000_000_000 + i, payload=b"p%d" % i, channel="a/b" if i else None)
        for i in range(count)
    ]
    return bytes(encode_batch(entries, base_seqno=base_seqno, epoch=3).data)


def _messages() -> list[Message]:
    """One populated instance of every request (and response) message."""
    session = pb.MulticastSession(
        group="ff15::1:2",
        port=40_000,
        cast_id=0xDEADBEEF,
        page_size_bytes=1_400,
        epoch=3,
        interface_hint="::1",
        heartbeat_interval_ms=100,
    )
    return [
        pb.ProduceRequest(
            producer_id="p-1",
            batch_sequence=7,
            ack_level=pb.ACK_LEVEL_QUORUM,
            expected_first_seqno=11,
            encoded_batch=_batch_bytes(1, 3),
        ),
        pb.ProduceRequest(
            producer_id="p-1",
            batch_sequence=8,
            ack_level=pb.ACK_LEVEL_NONE,
            record_list=pb.RecordList(
                records=[
                    pb.Record(timestamp_ms=5, channel="", key=b"", payload=b"x"),
                    pb.Record(payload=b"\x00" * 10),
                ]
            ),
        ),
        pb.ProduceResponse(
            batch_sequence=7,
            ack=pb.ProduceAck(base_seqno=11, record_count=3, epoch=3, commit_seqno=13),
        ),
        pb.ProduceResponse(
            batch_sequence=8,
            error=pb.Error(code=9, message="expected 11", retriable=False, next_seqno=14),
        ),
        pb.HandshakeRequest(subscriber_id="s-1"),
        pb.HandshakeResponse(session=session, first_seqno=1, last_seqno=20, commit_seqno=19),
        pb.SubscribeRequest(seqno=5, until_seqno=9, channel_prefix="a/"),
        pb.SubscribeRequest(earliest=True, count=100),
        pb.SubscribeRequest(latest=True),
        pb.SubscribeRequest(time_ms=1_700_000_000_000, channel_prefix=""),
        pb.SubscribeResponse(batches=_batch_bytes(5, 4), first_seqno=6, last_seqno=8),
        pb.NotificationsRequest(min_interval_ms=50),
        pb.NotificationsResponse(
            log_dir="/var/lib/boomscooter",
            segment_file="00000000000000000001.log",
            file_size_bytes=4096,
            last_seqno=20,
            commit_seqno=19,
            first_seqno=1,
        ),
        pb.FetchRequest(from_seqno=3, to_seqno=9, max_bytes=1 << 20, include_uncommitted=True),
        pb.FetchRequest(from_seqno=3),
        pb.FetchResponse(batches=_batch_bytes(1, 9), first_seqno=3, last_seqno=9),
        pb.ReplicateRequest(
            replica_id="r-1", address="[::1]:7001", durable_seqno=18, last_seqno=20, last_epoch=3
        ),
        pb.ReplicateResponse(
            session=session,
            commit_seqno=19,
            last_seqno=20,
            truncate_after_seqno=0,
            min_insync=2,
            replica_addresses=["[::1]:7002"],
            cast_address="[::1]:7800",
            sealed_segments=["00000000000000000001.log"],
            first_seqno=1,
            producer_batches=[
                pb.ProducerBatch(
                    producer_id="p-1", batch_sequence=7, base_seqno=11, record_count=3, epoch=3
                )
            ],
        ),
        pb.PromoteRequest(min_insync=2, force=True),
        pb.PromoteResponse(epoch=4, last_seqno=20, commit_seqno=19, gathered_records=2),
        pb.FenceRequest(epoch=5, leader="10.0.0.2:7700"),
        pb.FenceResponse(status=pb.StatusResponse(role=pb.ROLE_REPLICA, epoch=5)),
        pb.StatusRequest(),
        pb.StatusResponse(
            role=pb.ROLE_LEADER,
            node_id="n-1",
            epoch=3,
            first_seqno=1,
            last_seqno=20,
            commit_seqno=19,
            durable_seqno=20,
            leader_address="[::1]:7000",
            min_insync=2,
            replicas=[pb.ReplicaStatus(replica_id="r-1", durable_seqno=18, lag_records=2)],
        ),
    ]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_message_round_trip(message: Message) -> None:
    wire = message.SerializeToString(deterministic=True)
    back = type(message).FromString(wire)
    assert back == message
    assert back.SerializeToString(deterministic=True) == wire


def test_every_message_is_exercised() -> None:
    exercised = {type(m).DESCRIPTOR.name for m in _messages()}
    helpers = {"Record", "RecordList", "Error", "ProduceAck", "MulticastSession", "ReplicaStatus",
               "ProducerBatch"}  # fmt: skip
    assert set(pb.DESCRIPTOR.message_types_by_name) - exercised <= helpers


def test_presence_survives_the_wire() -> None:
    """proto3 `optional` and oneofs keep "absent" apart from the zero value."""
    record = pb.Record.FromString(pb.Record(channel="", key=b"").SerializeToString())
    assert record.HasField("channel") and record.HasField("key")
    bare = pb.Record.FromString(pb.Record(payload=b"x").SerializeToString())
    assert not bare.HasField("channel") and not bare.HasField("key")

    request = pb.SubscribeRequest.FromString(pb.SubscribeRequest(seqno=0).SerializeToString())
    assert request.WhichOneof("start") == "seqno"
    assert request.WhichOneof("end") is None
    assert not request.HasField("channel_prefix")

    fetch = pb.FetchRequest.FromString(pb.FetchRequest(from_seqno=1).SerializeToString())
    assert not fetch.HasField("to_seqno")
    truncate = pb.ReplicateResponse(truncate_after_seqno=0)
    assert pb.ReplicateResponse.FromString(truncate.SerializeToString()).HasField(
        "truncate_after_seqno"
    )
    produce = pb.ProduceRequest.FromString(pb.ProduceRequest().SerializeToString())
    assert produce.WhichOneof("records") is None and produce.ack_level == pb.ACK_LEVEL_UNSPECIFIED


def test_encoded_batches_travel_as_stored() -> None:
    """The bytes field carries storage batches unchanged: the receiver splits and checks them."""
    data = _batch_bytes(5, 4) + _batch_bytes(9, 2)
    wire = pb.SubscribeResponse(batches=data, first_seqno=5, last_seqno=10).SerializeToString()
    batches = split_batches(pb.SubscribeResponse.FromString(wire).batches)
    assert [(b.base_seqno, b.record_count, b.epoch) for b in batches] == [(5, 4, 3), (9, 2, 3)]


class _FixedStatus(pb_grpc.BoomscooterServicer):
    """A servicer that implements only Status (the others answer UNIMPLEMENTED)."""

    async def Status(
        self,
        request: pb.StatusRequest,
        context: grpc.aio.ServicerContext[pb.StatusRequest, pb.StatusResponse],
    ) -> pb.StatusResponse:
        return pb.StatusResponse(
            role=pb.ROLE_REPLICA,
            node_id="fixed",
            epoch=4,
            first_seqno=1,
            last_seqno=42,
            commit_seqno=40,
            leader_address="127.0.0.1:1",
        )


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server, port = await start_server(_FixedStatus(), listen="127.0.0.1:0")
    assert port > 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            yield chan
    finally:
        await server.stop(None)


async def test_server_answers_status(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.BoomscooterStub(channel)
    reply = await stub.Status(pb.StatusRequest(), timeout=10)
    assert (reply.role, reply.node_id, reply.epoch) == (pb.ROLE_REPLICA, "fixed", 4)
    assert (reply.first_seqno, reply.last_seqno, reply.commit_seqno) == (1, 42, 40)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Handshake(pb.HandshakeRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_reports_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    replies = [reply async for reply in stub.ServerReflectionInfo(iter(requests), timeout=10)]
    assert len(replies) == 2
    listed = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE_NAME, HEALTH_SERVICE_NAME} <= listed
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in replies[1].file_descriptor_response.file_descriptor_proto
    ]
    (described,) = [f for f in files if f.package == "boomscooter.v1"]
    assert {m.name for m in described.service[0].method} == set(CONTRACT_RPCS) | set(EXTENSION_RPCS)
