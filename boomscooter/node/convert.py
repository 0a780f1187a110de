"""Protobuf ↔ domain values for a node's rpc edge (the servicer, its Replicate side, and the
node's own calls to other nodes): protobuf messages go no further than this."""

from __future__ import annotations

from boomscooter.node.core import Appended, StreamSession
from boomscooter.node.machine import SessionOffer
from boomscooter.node.rules import PeerRole, PeerStatus
from boomscooter.v1 import boomscooter_pb2 as pb

ROLES = {
    PeerRole.LEADER: pb.ROLE_LEADER,
    PeerRole.REPLICA: pb.ROLE_REPLICA,
    PeerRole.NONE: pb.ROLE_UNSPECIFIED,  # starting, stepping down, stopped: no peer counts it
}
_PEER_ROLES = {pb.ROLE_LEADER: PeerRole.LEADER, pb.ROLE_REPLICA: PeerRole.REPLICA}


def session_message(session: StreamSession | None) -> pb.MulticastSession:
    """The stream a node's subscribers join (a replica's is its leader's; none before a
    replica reached its leader)."""
    if session is None:
        return pb.MulticastSession()
    return pb.MulticastSession(
        group=session.group,
        port=session.port,
        cast_id=session.cast_id,
        page_size_bytes=session.page_size_bytes,
        epoch=session.epoch,
        interface_hint=session.interface_hint,
        heartbeat_interval_ms=session.heartbeat_ms,
        source_port=session.source_port,
    )


def stream_session(message: pb.MulticastSession) -> StreamSession:
    return StreamSession(
        group=message.group,
        port=message.port,
        cast_id=message.cast_id,
        page_size_bytes=message.page_size_bytes,
        epoch=message.epoch,
        interface_hint=message.interface_hint,
        heartbeat_ms=message.heartbeat_interval_ms,
        source_port=message.source_port,
    )


def session_offer(first: pb.ReplicateResponse) -> SessionOffer:
    """A leader's first answer on a Replicate session."""
    return SessionOffer(
        session=stream_session(first.session),
        commit_seqno=first.commit_seqno,
        last_seqno=first.last_seqno,
        first_seqno=first.first_seqno,
        min_insync=first.min_insync,
        keepalive_ms=first.keepalive_ms,
        replica_addresses=tuple(first.replica_addresses),
    )


def peer_status(response: pb.StatusResponse) -> PeerStatus:
    return PeerStatus(
        role=_PEER_ROLES.get(response.role, PeerRole.NONE),
        epoch=response.epoch,
        leader_address=response.leader_address,
        first_seqno=response.first_seqno,
        last_seqno=response.last_seqno,
        last_epoch=response.last_epoch,
    )


def producer_batch(producer_id: str, sequence: int, appended: Appended) -> pb.ProducerBatch:
    return pb.ProducerBatch(
        producer_id=producer_id,
        batch_sequence=sequence,
        base_seqno=appended.base_seqno,
        record_count=appended.record_count,
        epoch=appended.epoch,
    )


def producer_batches(response: pb.ReplicateResponse) -> list[tuple[str, int, Appended]]:
    return [
        (e.producer_id, e.batch_sequence, Appended(e.base_seqno, e.record_count, e.epoch))
        for e in response.producer_batches
    ]
