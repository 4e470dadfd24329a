"""Client audits (issue 11), the rules as properties: the client's draw and outbox, the
wire payload and its parser, and the verifier's quota, fair queue, compute budget and
reports-first priority. Real nodes and a real verifier: tests/test_audits.py."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.client.audits import (
    AuditOptionError,
    Auditor,
    audit_payload,
    audit_targets,
    check_audit_rate,
    make_auditor,
)
from trustswarm.models.compute import run_limited
from trustswarm.protocol.codec import Message, encode_message
from trustswarm.protocol.digests import bytes_digest, tensors_digest
from trustswarm.protocol.evidence import (
    DisagreementReport,
    Evidence,
    ReplicaAnswer,
    SignedExchange,
)
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.statement import Statement, sign_statement
from trustswarm.verifier.audit_queue import (
    AuditQueueError,
    FairQueue,
    Priority,
    Quota,
    budget_pause,
)
from trustswarm.verifier.audits import BadAudit, parse_audit
from trustswarm.verifier.config import AuditConfig

VERIFIER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWLRPJAA5o6Z6gSGTDyDJq6QSFuLEhGVxqnMGVLT4nk1zZ"


def signed_forward(identity: Identity | None = None, tokens: int = 3) -> SignedExchange:
    """A real signed forward exchange (a server's signature over request and output)."""
    identity = identity or Identity.generate()
    hidden = torch.randn(1, tokens, 8)
    request = encode_message(Message({"hidden_states": hidden}, {"start": "0", "end": "2"}))
    tensors = {"hidden_states": hidden * 2}
    statement = Statement(
        kind="forward",
        server_peer_id=str(identity.peer_id),
        model_id="m",
        start=0,
        end=2,
        weights_digest="0" * 64,
        request_digest=bytes_digest(request),
        output_digest=tensors_digest(tensors),
        session_id="",
        step=0,
        chain="",
        dtype="float32",
        timestamp=time.time(),
    )
    answer = Message(tensors, sign_statement(identity, statement).to_meta())
    return SignedExchange(request, encode_message(answer))


# -- the client's options and draw ----------------------------------------------------


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_audit_rate_is_a_share(rate: float):
    if math.isfinite(rate) and 0 <= rate <= 1:
        assert check_audit_rate(rate) == rate
    else:
        with pytest.raises(AuditOptionError):
            check_audit_rate(rate)


@pytest.mark.parametrize("bad", [True, "0.1", None, [0.1]])
def test_audit_rate_refuses_non_numbers(bad):
    with pytest.raises(ValueError):  # our error is a ValueError like the other options
        check_audit_rate(bad)


def test_audits_go_to_verifiers_the_client_can_dial():
    assert audit_targets(["12D3KooWLRPJAA5o6Z6gSGTDyDJq6QSFuLEhGVxqnMGVLT4nk1zZ", VERIFIER]) == [
        VERIFIER
    ]
    assert make_auditor([VERIFIER], 0.0) is None  # audit_rate=0: off
    assert make_auditor(["12D3KooWLRPJAA5o6Z6gSGTDyDJq6QSFuLEhGVxqnMGVLT4nk1zZ"], 0.5) is None
    auditor = make_auditor([VERIFIER], 0.05)
    assert auditor is not None and auditor.rate == 0.05


@settings(max_examples=50, deadline=None, derandomize=True)  # a statistical bound: fixed draws
@given(st.floats(0.0, 1.0), st.integers(0, 2**32))
def test_the_draw_chooses_about_rate_of_the_exchanges(rate: float, seed: int):
    auditor = Auditor([VERIFIER], rate, max_pending=10**6, rng=random.Random(seed))
    evidence = Evidence((SignedExchange(b"q", b"a"),))
    n = 4000
    chosen = sum(auditor.offer(evidence) for _ in range(n))
    assert auditor.stats.offered == n and auditor.stats.chosen == chosen
    sigma = math.sqrt(n * rate * (1 - rate))
    # 5 sigma, and a few events of slack where the expected count is below one.
    assert abs(chosen - n * rate) <= 5 * sigma + (3 if 0 < rate < 1 else 1e-9)


@given(st.integers(1, 8), st.integers(0, 40), st.integers(1, 3))
def test_the_outbox_keeps_the_newest_and_counts_what_it_drops(
    max_pending: int, offers: int, verifiers: int
):
    targets = [VERIFIER.replace("tcp/9", f"tcp/{9 + i}") for i in range(verifiers)]
    auditor = Auditor(targets, 1.0, max_pending=max_pending)
    offered = [Evidence((SignedExchange(bytes([i % 256]), b"a"),)) for i in range(offers)]
    for evidence in offered:
        assert auditor.offer(evidence)
    kept = offered[max(0, offers - max_pending) :]
    for box in auditor.outboxes:
        assert list(box.pending) == kept
    assert auditor.stats.dropped == verifiers * max(0, offers - max_pending)
    assert auditor.pending == verifiers * len(kept)


# -- the wire: payload and parser -----------------------------------------------------

_AUDIT = audit_payload(Evidence((signed_forward(),)))


def test_audit_payload_round_trips_through_the_parser():
    exchange = signed_forward()
    payload = audit_payload(Evidence((exchange,)))
    (opened,) = parse_audit(payload).open()
    assert parse_audit(payload).exchanges == (exchange,)
    assert opened.statement.kind == "forward"
    report = DisagreementReport.from_bytes(payload)
    assert report.answers[0].peer_id == opened.statement.server_peer_id
    assert (report.kind, report.start, report.end) == ("forward", 0, 2)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_parse_audit_arbitrary_bytes(data: bytes):
    try:
        evidence = parse_audit(data)
    except BadAudit:
        return
    assert 1 <= len(evidence.exchanges)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_AUDIT) - 1), st.integers(0, 255), st.integers(0, len(_AUDIT)))
def test_parse_audit_mutations(position: int, value: int, cut: int):
    mutated = bytearray(_AUDIT)
    mutated[position] = value
    for data in (bytes(mutated), _AUDIT[:cut], _AUDIT + b"x"):
        try:
            evidence = parse_audit(data)
        except BadAudit:
            continue
        assert len(evidence.exchanges) == 1


def test_parse_audit_limits():
    answer = DisagreementReport.from_bytes(_AUDIT).answers[0]
    both = DisagreementReport(
        "m", 0, 2, "forward", (answer, ReplicaAnswer("x", answer.evidence, 1)), None, "unresolved"
    ).to_bytes()
    with pytest.raises(BadAudit, match="exactly one"):
        parse_audit(both)
    steps = Evidence((SignedExchange(b"q0", b"a0"), SignedExchange(b"q1", b"a1")))
    session = DisagreementReport(
        "m", 0, 2, "inference", (ReplicaAnswer("x", steps, 0),), None, "unresolved"
    ).to_bytes()
    assert len(parse_audit(session).exchanges) == 2
    with pytest.raises(BadAudit, match="exchanges"):
        parse_audit(session, AuditConfig(max_exchanges=1))
    with pytest.raises(BadAudit):
        parse_audit(_AUDIT, AuditConfig(max_bytes=len(_AUDIT) - 1))
    assert parse_audit(_AUDIT, AuditConfig(max_bytes=len(_AUDIT))).exchanges


# -- the verifier's rules: quota, fair queue, budget, priority ------------------------

EVENTS = st.lists(
    st.tuples(st.sampled_from("abc"), st.floats(0.0, 5.0, allow_nan=False)), max_size=80
)


@given(st.integers(0, 5), st.floats(0.5, 10.0), EVENTS)
def test_quota_bounds_each_client_in_every_window(limit: int, window: float, events):
    quota = Quota(limit, window)
    now, admitted = 0.0, []
    for key, gap in events:
        now += gap
        if quota.admit(key, now):
            admitted.append((key, now))
        else:  # refused only when the client used its whole allowance in the window
            recent = [t for k, t in admitted if k == key and t > now - window]
            assert len(recent) >= limit
    for key, t in admitted:  # no window (t - window, t] holds more than `limit`
        assert sum(1 for k, u in admitted if k == key and t - window < u <= t) <= limit


@given(st.integers(1, 5), st.floats(0.5, 10.0), EVENTS)
def test_quota_of_one_client_is_independent_of_the_others(limit: int, window: float, events):
    alone, shared = Quota(limit, window), Quota(limit, window)
    now = 0.0
    for key, gap in events:
        now += gap
        got = shared.admit(key, now)
        if key == "a":
            assert got == alone.admit("a", now)


def test_quota_settings_are_checked():
    with pytest.raises(AuditQueueError):
        Quota(-1, 60.0)
    with pytest.raises(AuditQueueError):
        Quota(3, 0.0)
    assert not Quota(0, 60.0).admit("a", 1.0)  # 0: every audit refused


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abcd"), st.integers(0, 40)),
        st.tuples(st.just("get"), st.just(""), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=300)
@given(st.integers(1, 12), st.integers(40, 200), OPS)
def test_fair_queue_capacity_order_and_eviction(max_items: int, max_bytes: int, ops):
    queue: FairQueue[int] = FairQueue(max_items, max_bytes)
    sizes: dict[int, tuple[str, int]] = {}
    outcome: dict[int, str] = {}
    for n, (op, key, size) in enumerate(ops):
        if op == "put":
            before = {
                k: sum(s for i, (kk, s) in sizes.items() if kk == k and i not in outcome)
                for k in "abcd"
            }
            sizes[n] = (key, size)
            before[key] += size
            for owner, item in queue.put(key, n, size):
                assert sizes[item][0] == owner and item not in outcome
                # The oldest of a client holding the most bytes at that moment.
                assert before[owner] == max(before.values())
                assert item == min(
                    i for i, (k, _) in sizes.items() if k == owner and i not in outcome
                )
                outcome[item] = "evicted"
                before[owner] -= sizes[item][1]
        else:
            got = queue.get()
            if got is None:
                assert len(queue) == 0
                continue
            owner, item = got
            assert item == min(i for i, (k, _) in sizes.items() if k == owner and i not in outcome)
            outcome[item] = "served"
        live = [i for i in sizes if i not in outcome]
        assert len(queue) == len(live) <= max_items
        assert queue.bytes == sum(sizes[i][1] for i in live) <= max_bytes


@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=30))
def test_fair_queue_serves_clients_in_turn(keys):
    queue: FairQueue[int] = FairQueue(1000, 10**6)
    for n, key in enumerate(keys):
        queue.put(key, n, 1)
    served = []
    while (got := queue.get()) is not None:
        served.append(got[0])
    # Between two turns of one client, every client that still had audits had one.
    for i, key in enumerate(served):
        later = served[i + 1 :]
        if key in later:
            between = set(later[: later.index(key)])
            waiting = {k for k in set(keys) if k != key and k in served[i + 1 :]}
            assert waiting <= between


def test_fair_queue_refuses_items_larger_than_itself():
    with pytest.raises(AuditQueueError):
        FairQueue(4, 10).put("a", 1, 11)
    with pytest.raises(AuditQueueError):
        FairQueue(0, 10)


@given(st.floats(1e-9, 1e4), st.floats(0.001, 1.0))
def test_budget_pause_keeps_audits_within_their_share(compute: float, share: float):
    pause = budget_pause(compute, share)
    assert pause >= 0
    assert compute / (compute + pause) == pytest.approx(share, rel=1e-9)
    assert budget_pause(compute, 1.0) == 0.0
    assert budget_pause(0.0, share) == budget_pause(-compute, share) == 0.0


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5, math.nan])
def test_budget_share_is_checked(share: float):
    with pytest.raises(AuditQueueError):
        budget_pause(1.0, share)


def test_reports_go_first():
    """An audit waits while a report's compute waits or runs; it starts once none is left."""
    order: list[str] = []

    async def main() -> None:
        limiter = trio.CapacityLimiter(1)
        priority = Priority()

        async def compute(fn, *args):
            return await run_limited(limiter, fn, *args)

        report = priority.wrap(compute)

        async def one_report(name: str) -> None:
            await report(lambda: (time.sleep(0.05), order.append(name)))

        async def audit() -> None:
            await trio.sleep(0.01)  # queued after the first report started
            await priority.wait_idle()
            await compute(order.append, "audit")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_report, "report 1")
            nursery.start_soon(audit)
            await trio.sleep(0.02)
            nursery.start_soon(one_report, "report 2")  # arrives while the audit waits

    trio.run(main)
    assert order == ["report 1", "report 2", "audit"]
