"""The client's TrustView (unit + hypothesis) and reputation-aware routing."""

from __future__ import annotations

import random
import statistics
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.client.routing import latency_route, throughput_route
from trustswarm.client.swarm import SwarmView
from trustswarm.client.trust import TrustView, make_trust_view
from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.identity import Identity
from trustswarm.reputation.records import ReputationRecord, SignedReputationRecord, sign_record

MODEL = "tiny/model"
VERIFIERS = [Identity.generate() for _ in range(5)]
STRANGER = Identity.generate()
SERVERS = [str(Identity.generate().peer_id) for _ in range(3)]
SETTINGS = settings(max_examples=60, deadline=None)


def rec(
    verifier: Identity,
    subject: str = SERVERS[0],
    score: float = 0.9,
    state: str = "ok",
    sequence: int = 1,
    ttl: float = 600.0,
    model_id: str = MODEL,
) -> SignedReputationRecord:
    now = time.time()
    return sign_record(
        verifier,
        ReputationRecord(
            verifier_id=str(verifier.peer_id),
            subject=subject,
            model_id=model_id,
            start=0,
            end=6,
            score=score,
            state=state,
            passes=10,
            failures=0,
            issued_at=min(now, now + ttl) - 1,
            expires_at=now + ttl,
            sequence=sequence,
        ),
    )


def view(n: int = 5, min_reputation: float = 0.5) -> TrustView:
    return TrustView({str(v.peer_id) for v in VERIFIERS[:n]}, min_reputation, MODEL)


scores = st.floats(min_value=0.01, max_value=0.99)


@SETTINGS
@given(st.lists(scores, min_size=1, max_size=5), st.floats(0, 1))
def test_median_of_trusted_verifiers(values: list[float], threshold: float) -> None:
    trust = view(min_reputation=threshold)
    for verifier, score in zip(VERIFIERS, values, strict=False):
        assert trust.accept(rec(verifier, score=score))
    assert trust.score(SERVERS[0]) == pytest.approx(statistics.median(values))
    assert trust.allowed(SERVERS[0]) == (statistics.median(values) >= threshold)
    assert trust.score(SERVERS[1]) is None and trust.allowed(SERVERS[1])  # unknown: allowed


@SETTINGS
@given(scores, scores)
def test_untrusted_verifier_ignored(trusted_score: float, other_score: float) -> None:
    trust = view(1)
    assert not trust.accept(rec(STRANGER, score=other_score))
    assert not trust.accept(rec(STRANGER, state="banned", score=0.0))
    assert not trust.accept(rec(VERIFIERS[1], score=other_score))  # known, not trusted here
    assert trust.score(SERVERS[0]) is None and trust.allowed(SERVERS[0])
    assert trust.accept(rec(VERIFIERS[0], score=trusted_score))
    assert trust.score(SERVERS[0]) == trusted_score


@SETTINGS
@given(scores, st.floats(min_value=1, max_value=1e6))
def test_expired_is_absent(score: float, age: float) -> None:
    trust = view()
    stale = rec(VERIFIERS[0], score=score, ttl=30)
    assert not trust.accept(rec(VERIFIERS[1], score=score, ttl=-age))  # already expired
    assert trust.accept(stale)
    later = time.time() + 30 + age
    assert trust.score(SERVERS[0]) == score
    assert trust.score(SERVERS[0], now=later) is None
    assert trust.allowed(SERVERS[0], now=later)  # treated as unknown again
    # An expired ban is absent too.
    trust.accept(rec(VERIFIERS[2], state="banned", score=0.0, ttl=30, sequence=2))
    assert not trust.allowed(SERVERS[0])
    assert trust.allowed(SERVERS[0], now=later)
    trust.forget_expired(now=later)
    assert trust.records == {}


@SETTINGS
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=20, unique=True))
def test_older_sequence_ignored(sequences: list[int]) -> None:
    trust = view()
    best = -1
    for seq in sequences:
        accepted = trust.accept(rec(VERIFIERS[0], score=0.01 + seq / 2000, sequence=seq))
        assert accepted == (seq > best)
        best = max(best, seq)
    assert trust.records[(str(VERIFIERS[0].peer_id), SERVERS[0])].record.sequence == best
    assert trust.score(SERVERS[0]) == pytest.approx(0.01 + best / 2000)


def test_forged_other_model_and_garbage_rejected() -> None:
    trust = view()
    good = rec(VERIFIERS[0])
    forged = SignedReputationRecord(good.record, STRANGER.sign(good.record.canonical_bytes()))
    assert not trust.accept(forged)
    assert not trust.accept(rec(VERIFIERS[0], model_id="other/model"))
    assert not trust.accept_bytes(b"{nonsense")
    assert trust.accept_bytes(good.to_bytes())


def test_ban_by_any_trusted_verifier_excludes() -> None:
    trust = view()
    for verifier in VERIFIERS[:4]:
        trust.accept(rec(verifier, score=0.99))
    assert trust.allowed(SERVERS[0]) and trust.state(SERVERS[0]) == "ok"
    trust.accept(rec(VERIFIERS[4], state="banned", score=0.0))
    assert trust.banned(SERVERS[0]) and not trust.allowed(SERVERS[0])
    assert trust.state(SERVERS[0]) == "banned"
    assert trust.score(SERVERS[0]) == 0.99  # median unmoved by one verifier, but banned


def test_rank_prefers_established_then_score() -> None:
    trust = view(1)
    ok_high, ok_low, probation = SERVERS
    trust.accept(rec(VERIFIERS[0], ok_high, score=0.95, state="ok"))
    trust.accept(rec(VERIFIERS[0], ok_low, score=0.85, state="ok"))
    trust.accept(rec(VERIFIERS[0], probation, score=0.97, state="probation"))
    unknown = str(STRANGER.peer_id)
    order = sorted([unknown, probation, ok_low, ok_high], key=trust.rank_key)
    assert order == [ok_high, ok_low, probation, unknown]
    penalties = [trust.route_penalty(p) for p in order]
    weights = [trust.route_weight(p) for p in order]
    assert penalties == sorted(penalties) and min(penalties) >= 0
    assert weights == sorted(weights, reverse=True) and max(weights) <= 1


@pytest.mark.parametrize(
    ("verifiers", "minimum"),
    [("12D3KooWsingle", 0.5), (["not-a-peer-id"], 0.5), ([], 1.5), ([], -0.1), ([], True)],
)
def test_make_trust_view_rejects_bad_options(verifiers: object, minimum: object) -> None:
    with pytest.raises(ValueError):
        make_trust_view(verifiers, minimum, MODEL)  # type: ignore[arg-type]


def test_make_trust_view_none_without_verifiers() -> None:
    assert make_trust_view([], 0.5, MODEL) is None
    trust = make_trust_view([str(VERIFIERS[0].peer_id)], 0.7, MODEL)
    assert trust is not None and trust.min_reputation == 0.7


# --------------------------------------------------------------------- routing


def ann(peer: str, start: int = 0, end: int = 6, throughput: float = 100.0) -> Announcement:
    now = time.time()
    return Announcement(
        peer_id=peer,
        model_id=MODEL,
        start=start,
        end=end,
        weights_digest="d" * 64,
        dtype="float32",
        throughput=throughput,
        addrs=(),
        issued_at=now,
        expires_at=now + 600,
    )


def make_view(trust: TrustView | None) -> SwarmView:
    v = SwarmView(model_id=MODEL, span_digest=lambda a, b: "d" * 64, trust=trust)
    for peer in SERVERS:
        v.servers[peer] = ann(peer)
        v.rtts[peer] = 0.01
    return v


def test_swarm_view_without_trust_is_unchanged() -> None:
    plain = make_view(None)
    assert {a.peer_id for a in plain.usable()} == set(SERVERS)
    route = plain.inference_route(0, 6)
    assert route == latency_route(plain.usable(), 0, 6, plain.rtts)
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert plain.forward_route(0, 6, rng_a) == throughput_route(plain.usable(), 0, 6, rng_b)


def test_swarm_view_filters_and_prefers() -> None:
    trust = view(1, min_reputation=0.5)
    good, low, banned = SERVERS
    trust.accept(rec(VERIFIERS[0], good, score=0.95))
    trust.accept(rec(VERIFIERS[0], low, score=0.3, state="probation"))
    trust.accept(rec(VERIFIERS[0], banned, score=0.0, state="banned"))
    v = make_view(trust)
    assert [a.peer_id for a in v.usable()] == [good]
    # An unknown server is usable, but an established one wins at equal speed...
    newcomer = str(STRANGER.peer_id)
    v.servers[newcomer] = ann(newcomer)
    v.rtts[newcomer] = 0.01
    assert {a.peer_id for a in v.usable()} == {good, newcomer}
    assert [h.server.peer_id for h in v.inference_route(0, 6)] == [good]
    # ... and so does it against a much faster newcomer (a Sybil may boast its speed):
    # servers on probation carry traffic only where established ones cannot.
    v.rtts[newcomer] = 0.001
    v.rtts[good] = 0.5
    assert [h.server.peer_id for h in v.inference_route(0, 6)] == [good]
    rng = random.Random(3)
    picks = {v.forward_route(0, 6, rng)[0].server.peer_id for _ in range(50)}
    assert picks == {good}
    v.banned_for_session.add(good)  # no established server left: the newcomer serves
    assert [h.server.peer_id for h in v.inference_route(0, 6)] == [newcomer]
