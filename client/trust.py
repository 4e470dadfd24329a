"""What the client believes about servers, from the verifiers it trusts.

`TrustView` keeps the newest record per (trusted verifier, server). A server's score
is the median over the trusted verifiers' unexpired records (a single lying or
stale verifier cannot move it far); a ban by any trusted verifier excludes the
server; expired records count as absent. Servers no trusted verifier has scored are
on probation: usable, but routed to only when established servers do not serve
better. `TrustFeed` keeps the view fed: the gossipsub record topic (pushed within
milliseconds) and, on every swarm refresh, the DHT records of each known server.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio
from libp2p.kad_dht.kad_dht import KadDHT

from trustswarm.protocol.identity import parse_peer_id
from trustswarm.protocol.transport import parse_peer_addr
from trustswarm.reputation.records import SignedReputationRecord, record_key
from trustswarm.reputation.score import BANNED, OK, PROBATION

log = logging.getLogger("trustswarm.client")

# Route preferences (seconds added to a hop's cost in latency routes): a server on
# probation or unknown costs like a slow extra round trip, and every point of score
# below 1 costs up to SCORE_PENALTY more. Established, well-scored servers win ties
# and near-ties; a probation server is still used when it is much faster or alone.
PROBATION_PENALTY = 0.05
SCORE_PENALTY = 0.1
UNKNOWN_SCORE = 0.5  # the neutral prior of the score model


@dataclass
class TrustView:
    trusted_verifiers: set[str]
    min_reputation: float = 0.5
    model_id: str | None = None  # when set, records for other models are ignored
    records: dict[tuple[str, str], SignedReputationRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trusted_verifiers = {str(v) for v in self.trusted_verifiers}
        if not 0.0 <= self.min_reputation <= 1.0:
            raise ValueError(f"min_reputation must lie in [0, 1], got {self.min_reputation!r}")

    def accept(self, signed: SignedReputationRecord, now: float | None = None) -> bool:
        """Keep `signed` if a trusted verifier signed it for our model, it is unexpired,
        and it is newer (by sequence) than what we hold for that (verifier, server)."""
        rec = signed.record
        if rec.verifier_id not in self.trusted_verifiers:
            return False
        if self.model_id is not None and rec.model_id != self.model_id:
            return False
        try:
            signed.verify(now)
        except Exception as exc:
            log.debug("ignoring reputation record from %s: %s", rec.verifier_id, exc)
            return False
        key = (rec.verifier_id, rec.subject)
        current = self.records.get(key)
        if current is not None and rec.sequence <= current.record.sequence:
            return False
        self.records[key] = signed
        if rec.state == BANNED and (current is None or current.record.state != BANNED):
            log.warning("verifier %s banned server %s", rec.verifier_id, rec.subject)
        return True

    def accept_bytes(self, data: bytes, now: float | None = None) -> bool:
        try:
            signed = SignedReputationRecord.from_bytes(data)
        except Exception:
            return False
        return self.accept(signed, now)

    def current(self, peer_id: str, now: float | None = None) -> list[SignedReputationRecord]:
        """Unexpired records about `peer_id`, one per trusted verifier that has one."""
        now = time.time() if now is None else now
        return [
            signed
            for verifier in sorted(self.trusted_verifiers)
            if (signed := self.records.get((verifier, peer_id))) is not None
            and not signed.record.expired(now)
        ]

    def score(self, peer_id: str, now: float | None = None) -> float | None:
        """Median score over trusted verifiers' unexpired records; None when unknown."""
        scores = [s.record.score for s in self.current(peer_id, now)]
        return statistics.median(scores) if scores else None

    def banned(self, peer_id: str, now: float | None = None) -> bool:
        return any(s.record.state == BANNED for s in self.current(peer_id, now))

    def state(self, peer_id: str, now: float | None = None) -> str:
        """banned (by any trusted verifier), ok (a majority of them say ok), else probation."""
        records = self.current(peer_id, now)
        if any(s.record.state == BANNED for s in records):
            return BANNED
        if records and 2 * sum(s.record.state == OK for s in records) > len(records):
            return OK
        return PROBATION

    def allowed(self, peer_id: str, now: float | None = None) -> bool:
        """Not banned by a trusted verifier and not scored below `min_reputation`.
        Unknown servers are allowed (on probation)."""
        if self.banned(peer_id, now):
            return False
        score = self.score(peer_id, now)
        return score is None or score >= self.min_reputation

    def rank_key(self, peer_id: str, now: float | None = None) -> tuple[int, float]:
        """Sort key, best first: established before probation, then higher score."""
        score = self.score(peer_id, now)
        established = self.state(peer_id, now) == OK
        return (0 if established else 1, -(UNKNOWN_SCORE if score is None else score))

    def route_penalty(self, peer_id: str, now: float | None = None) -> float:
        """Seconds added to a hop's cost in latency routes (0 for a perfect, ok server)."""
        tier, neg_score = self.rank_key(peer_id, now)
        return tier * PROBATION_PENALTY + (1.0 + neg_score) * SCORE_PENALTY

    def route_weight(self, peer_id: str, now: float | None = None) -> float:
        """Factor on a server's share of forward passes (1 for a perfect, ok server)."""
        tier, neg_score = self.rank_key(peer_id, now)
        return -neg_score * (0.5 if tier else 1.0)

    def forget_expired(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for key, signed in list(self.records.items()):
            if signed.record.expired(now):
                del self.records[key]


class TrustFeed:
    """Feeds a TrustView from the DHT: for each known server and trusted verifier, the
    newest record the network holds.

    py-libp2p's `get_value` answers from the local store when it has the key (and
    stores what it fetched), which would freeze the first answer forever, so the
    local copy is dropped before each lookup.
    """

    def __init__(self, view: TrustView, dht: KadDHT, timeout: float = 5.0) -> None:
        self.view = view
        self.dht = dht
        self.timeout = timeout

    async def fetch(self, servers: Iterable[str], model_id: str) -> int:
        """Look up every (trusted verifier, server) record; returns how many were new."""
        pairs = [(v, s) for s in servers for v in sorted(self.view.trusted_verifiers)]
        accepted = 0

        async def one(verifier: str, subject: str) -> None:
            nonlocal accepted
            key = record_key(verifier, subject, model_id)
            self.dht.value_store.remove(key.encode())
            with trio.move_on_after(self.timeout):
                try:
                    value = await self.dht.get_value(key)
                except Exception as exc:
                    log.debug("DHT lookup of %s's record on %s failed: %s", verifier, subject, exc)
                    return
                if value is not None and self.view.accept_bytes(value):
                    accepted += 1

        limiter = trio.CapacityLimiter(8)

        async def limited(verifier: str, subject: str) -> None:
            async with limiter:
                await one(verifier, subject)

        async with trio.open_nursery() as nursery:
            for verifier, subject in pairs:
                nursery.start_soon(limited, verifier, subject)
        return accepted


def verifier_peer_id(entry: str) -> str:
    """A trusted verifier is named by its peer id or by a full multiaddr (/p2p/<id>)."""
    if "/p2p/" in entry:
        try:
            return str(parse_peer_addr(entry).peer_id)
        except Exception:
            raise ValueError(f"trusted verifier {entry[:80]!r} is not a multiaddr") from None
    return entry


def make_trust_view(
    trusted_verifiers: Iterable[str], min_reputation: float, model_id: str
) -> TrustView | None:
    """A TrustView for the client's options, or None when no verifier is trusted (the
    client then behaves exactly as without reputation). Raises ValueError on bad input."""
    if isinstance(trusted_verifiers, str):
        raise ValueError("trusted_verifiers must be a list of peer ids, not one string")
    verifiers = [verifier_peer_id(str(v)) for v in trusted_verifiers]
    if isinstance(min_reputation, bool) or not isinstance(min_reputation, int | float):
        raise ValueError(f"min_reputation must be a number in [0, 1], got {min_reputation!r}")
    if not 0.0 <= min_reputation <= 1.0:
        raise ValueError(f"min_reputation must lie in [0, 1], got {min_reputation!r}")
    for verifier in verifiers:
        try:
            parse_peer_id(verifier)
        except Exception:
            raise ValueError(f"trusted verifier {verifier[:80]!r} is not a peer id") from None
    if not verifiers:
        return None
    return TrustView(set(verifiers), float(min_reputation), model_id)
