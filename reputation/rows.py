"""Reputation rows for `trustswarm reputation show`: from a verifier's database, or from
the records verifiers published in the swarm (valid, unexpired ones only)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import multiaddr
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from trustswarm.protocol.announcement import AnnouncementValidator
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.info import call_info
from trustswarm.protocol.protocols import DHT_NAMESPACE
from trustswarm.protocol.transport import connect_peers, make_host, parse_peer_addr

from .errors import ReputationError
from .records import (
    REPUTATION_NAMESPACE,
    ReputationValidator,
    SignedReputationRecord,
    record_key,
)
from .store import ReputationStore, database_url

log = logging.getLogger("trustswarm.reputation")


@dataclass(frozen=True)
class Row:
    peer_id: str
    state: str
    score: float | None  # None: no record (from the swarm)
    passes: int
    failures: int
    last_failure: str
    model_id: str
    verifier: str = ""  # from the swarm: whose record this is


def rows_from_db(url: str, model_id: str | None) -> list[Row]:
    full = database_url(url)
    if full.startswith("sqlite:///") and full != "sqlite:///:memory:":
        path = Path(full.removeprefix("sqlite:///"))
        if not path.exists():
            raise ReputationError(f"no database at {path}")
    store = ReputationStore(full)
    try:
        return [
            Row(
                peer_id=r.peer_id,
                state=r.state,
                score=r.score,
                passes=r.passes,
                failures=r.failures,
                last_failure=_failure_text(r.last_failure, r.last_failure_at, r.ban_reason),
                model_id=r.model_id,
            )
            for r in store.all(model_id)
        ]
    finally:
        store.close()


async def rows_from_swarm(
    initial_peers: list[str],
    verifiers: list[str],
    model_id: str | None,
    swarm_key: str | None,
    timeout: float,
) -> list[Row]:
    """Learn the servers from the initial peers' info answers, then read each
    (verifier, server) record from the DHT, keeping only valid, unexpired ones."""
    host = make_host(Identity.generate(), swarm_key)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        dht = KadDHT(host, DHTMode.CLIENT)
        dht.register_validator(DHT_NAMESPACE, AnnouncementValidator())
        dht.register_validator(REPUTATION_NAMESPACE, ReputationValidator())
        async with background_trio_service(dht):
            await connect_peers(host, dht, initial_peers, timeout)
            servers: dict[str, str] = {}  # peer id -> model id
            for text in initial_peers:
                info = parse_peer_addr(text)
                try:
                    with trio.fail_after(timeout):
                        await host.connect(PeerInfo(info.peer_id, info.addrs))
                    answer = await call_info(host, info.peer_id, timeout)
                except Exception as exc:
                    log.warning("peer %s gave no info: %s", info.peer_id, exc)
                    continue
                for signed in [answer.announcement, *answer.known]:
                    ann = signed.announcement
                    if model_id is None or ann.model_id == model_id:
                        servers[ann.peer_id] = ann.model_id
            rows = []
            for peer, model in sorted(servers.items()):
                for verifier in verifiers:
                    signed = await _fetch(dht, record_key(verifier, peer, model), timeout)
                    if signed is None:
                        rows.append(Row(peer, "unknown", None, 0, 0, "-", model, verifier))
                        continue
                    r = signed.record
                    why = _failure_text(None, None, r.ban_reason)  # signed by the verifier
                    rows.append(
                        Row(peer, r.state, r.score, r.passes, r.failures, why, model, verifier)
                    )
            return rows


async def _fetch(dht: KadDHT, key: str, timeout: float) -> SignedReputationRecord | None:
    with trio.move_on_after(timeout):
        try:
            value = await dht.get_value(key)
            if value is None:
                return None
            signed = SignedReputationRecord.from_bytes(value)
            signed.verify()
            return signed
        except Exception as exc:
            log.debug("no valid record under %s: %s", key, exc)
    return None


def _failure_text(detail: str | None, at: float | None, ban_reason: str | None) -> str:
    parts = []
    if ban_reason:
        parts.append(f"BANNED: {ban_reason}")
    if detail:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at)) if at is not None else "?"
        parts.append(f"{when} {detail}")
    return "; ".join(parts) or "-"
