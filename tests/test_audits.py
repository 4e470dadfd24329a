"""Client audits (issue 11): the rules (draw, outbox, quota, fair queue, budget, parser)
as properties, then real nodes and a real verifier on loopback (tiny model): a cheater no
spot-check sees is banned through a client's audits; honest float32 and bfloat16 servers
audited many times are never penalised; an audit never blocks the client; quotas refuse
a flooding client without disturbing others; sessions ended by failover are audited."""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.adversary import Tamper, adversarial_server_cls
from tests.swarm import LocalSwarm
from tests.verifier_env import (  # noqa: F401 - fixture
    RunningVerifier,
    one_torch_thread,
    start_verifier,
    stop_verifier,
    wait_until,
)
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.client.audits import (
    AuditOptionError,
    Auditor,
    audit_payload,
    audit_targets,
    check_audit_rate,
    make_auditor,
    send_audit,
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
from trustswarm.protocol.transport import make_host, running_host
from trustswarm.verifier.audit_queue import (
    AuditQueueError,
    FairQueue,
    Priority,
    Quota,
    budget_pause,
)
from trustswarm.verifier.audits import (
    FRAUD,
    INCONCLUSIVE,
    PASS,
    AuditResult,
    BadAudit,
    parse_audit,
)
from trustswarm.verifier.config import AuditConfig, CheckConfig, VerifierConfig
from trustswarm.verifier.daemon import Verifier  # noqa: F401 - the daemon under test

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_torch_thread")]

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


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 2**32))
def test_the_draw_chooses_about_rate_of_the_exchanges(rate: float, seed: int):
    auditor = Auditor([VERIFIER], rate, max_pending=10**6, rng=random.Random(seed))
    evidence = Evidence((SignedExchange(b"q", b"a"),))
    n = 4000
    chosen = sum(auditor.offer(evidence) for _ in range(n))
    assert auditor.stats.offered == n and auditor.stats.chosen == chosen
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(chosen - n * rate) <= 5 * sigma + 1e-9  # exact at rate 0 and 1


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


# -- real nodes, a real verifier ------------------------------------------------------
# Spot-checks are off (one per hour): whatever the verifier learns comes from audits.

QUIET = CheckConfig(check_every=3600.0)


def audit_verifier(swarm: LocalSwarm, tmp_path: Path, **audits: object) -> RunningVerifier:
    config = VerifierConfig(checks=QUIET, audits=AuditConfig(**audits))
    return start_verifier(swarm, f"sqlite:///{tmp_path / 'v.db'}", config)


def auditing_client(
    model_dir: Path, swarm: LocalSwarm, verifier: str, **kwargs: object
) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        model_dir, swarm.initial_peers, trusted_verifiers=[verifier], audit_rate=1.0, **kwargs
    )


def prompt(seed: int, tokens: int = 5) -> torch.Tensor:
    return torch.randint(3, 512, (1, tokens), generator=torch.Generator().manual_seed(seed))


def judged(verifier: RunningVerifier) -> list[AuditResult]:
    return list(verifier.verifier.audits.results)


def test_a_cheater_no_spot_check_sees_is_banned_through_audits(tiny_model_dir, tmp_path):
    swarm = LocalSwarm(tiny_model_dir)
    verifier = None
    try:
        honest = swarm.start_server((0, 3))
        cheat = swarm.start_server(
            (3, 6), server_cls=adversarial_server_cls(Tamper("noise", amount=0.05, seed=1))
        )
        verifier = audit_verifier(swarm, tmp_path)
        model_id = verifier.verifier.model_id
        with auditing_client(tiny_model_dir, swarm, verifier.addrs[0]) as client:
            client.generate(prompt(1), max_new_tokens=4)
            assert cheat.server.tampered > 0  # the client got wrong answers

            def banned() -> bool:
                rep = verifier.store.get(cheat.peer_id, model_id)
                return rep is not None and rep.state == "banned"

            wait_until(banned, timeout=60)
            # The client learns it from the verifier's signed record (gossip / DHT).
            wait_until(lambda: client.swarm.view.trust.banned(cheat.peer_id), timeout=60)
        assert not verifier.verifier.results  # no spot-check ran: the audit did it
        proof = DisagreementReport.from_bytes(verifier.store.ban_proof(cheat.peer_id, model_id))
        (answer,) = proof.answers
        steps = answer.evidence.open()
        assert {o.statement.server_peer_id for o in steps} == {cheat.peer_id}
        assert steps[0].statement.kind == "inference"  # a whole session transcript
        frauds = [r for r in judged(verifier) if r.outcome == FRAUD]
        assert frauds and frauds[0].peer_id == cheat.peer_id
        rep = verifier.store.get(honest.peer_id, model_id)
        assert rep is not None and rep.passes >= 1 and rep.failures == 0
        assert rep.state != "banned"
    finally:
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()


def test_honest_servers_audited_many_times_are_never_penalised(tiny_model_dir, tmp_path):
    """float32 and bfloat16 servers on both spans; every exchange audited: forward,
    backward and sessions, with and without redundancy."""
    swarm = LocalSwarm(tiny_model_dir)
    verifier = None
    try:
        servers = [
            swarm.start_server(span, dtype=dtype)
            for span in [(0, 3), (3, 6)]
            for dtype in (torch.float32, torch.bfloat16)
        ]
        verifier = audit_verifier(swarm, tmp_path, max_per_window=10_000)
        model_id = verifier.verifier.model_id
        rng = random.Random(3)
        chosen = 0
        for k in (1, 2):
            with auditing_client(tiny_model_dir, swarm, verifier.addrs[0], redundancy=k) as c:
                wait_until(lambda c=c: len(c.swarm.view.servers) == 4, timeout=30)
                for i in range(12):
                    for peer in c.swarm.view.rtts:  # vary the routes over both dtypes
                        c.swarm.view.rtts[peer] = rng.random()
                    c.generate(prompt(100 * k + i, 4 + i % 5), max_new_tokens=6)
                    ids = prompt(200 * k + i)
                    embeds = c.get_input_embeddings()(ids).detach().requires_grad_()
                    c(inputs_embeds=embeds, labels=ids).loss.backward()  # fine-tuning traffic
                wait_until(lambda c=c: c.swarm.auditor.pending == 0, timeout=60)
                chosen += c.swarm.auditor.stats.chosen
                assert c.swarm.auditor.stats.accepted == c.swarm.auditor.stats.chosen
        wait_until(lambda: len(judged(verifier)) >= chosen, timeout=120)
        results = judged(verifier)
        outcomes = Counter(r.outcome for r in results)
        per_server = Counter(r.peer_id for r in results if r.outcome == PASS)
        kinds = Counter(r.kind for r in results)
        print(f"\n[audits, honest] {len(results)} audits: {dict(outcomes)}, kinds {dict(kinds)}")
        assert len(results) >= 150
        assert set(outcomes) <= {PASS, INCONCLUSIVE}, [r.detail for r in results][:3]
        assert {"forward", "backward", "inference"} <= set(kinds)
        for server in servers:
            assert per_server[server.peer_id] >= 10  # each dtype on each span was audited
            rep = verifier.store.get(server.peer_id, model_id)
            assert rep.failures == 0 and rep.state != "banned", rep
    finally:
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()


def test_an_audit_never_blocks_the_client(tiny_model_dir, tmp_path):
    """A verifier that accepts TCP connections and never answers (the worst case: every
    audit hangs until its timeout), then one that is stopped (refuses connections)."""
    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server((0, 3))
        swarm.start_server((3, 6))

        async def blackhole(task_status=trio.TASK_STATUS_IGNORED) -> None:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            task_status.started(listeners[0].socket.getsockname()[1])
            held = []
            async with listeners[0]:
                while True:
                    held.append(await listeners[0].accept())  # and never say a word

        port = swarm.loop.run(lambda: swarm._nursery.start(blackhole))
        silent = f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"
        with auditing_client(tiny_model_dir, swarm, silent) as client:
            auditor = client.swarm.auditor
            for box in auditor.outboxes:
                box.max_pending = 2
            began = time.monotonic()
            for seed in range(4):  # two hops each: 8 audits
                client.generate(prompt(seed), max_new_tokens=6)
            seconds = time.monotonic() - began
            stats = auditor.stats
            # Every call returned while its audits were still hanging on the verifier:
            # 4 on the way (max_sending), the 2 newest queued, the 2 oldest queued dropped.
            assert stats.chosen == 8 and stats.sent == 0 and stats.failed == 0
            assert auditor.max_sending == 4 and auditor.pending == 6 and stats.dropped == 2
            assert seconds < auditor.timeout
        verifier = start_verifier(
            swarm, f"sqlite:///{tmp_path / 'v.db'}", VerifierConfig(checks=QUIET)
        )
        stop_verifier(swarm, verifier)
        with auditing_client(tiny_model_dir, swarm, verifier.addrs[0]) as client:
            client.generate(prompt(9), max_new_tokens=6)  # returns: nothing waits on audits
            wait_until(lambda: client.swarm.auditor.stats.failed >= 1, timeout=30)
            assert client.swarm.auditor.stats.accepted == 0
    finally:
        swarm.close()


def session_transcript(model_dir: Path, swarm: LocalSwarm, seed: int) -> Evidence:
    """What a client holds after a short session on its first hop (no audits drawn)."""
    with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers) as plain:
        assert plain.swarm.auditor is None
        embeds = plain.get_input_embeddings()(prompt(seed)).detach()
        with plain.inference_session(8) as session:
            session.step(embeds, torch.arange(5)[None], torch.ones(1, 5, dtype=torch.long))
            return Evidence(tuple(session.session.hops[0].transcript))


def test_quotas_refuse_a_flooding_client_without_disturbing_others(tiny_model_dir, tmp_path):
    swarm = LocalSwarm(tiny_model_dir)
    verifier = None
    try:
        swarm.start_server((0, 3))
        swarm.start_server((3, 6))
        verifier = audit_verifier(swarm, tmp_path, max_per_window=3)
        payload = audit_payload(session_transcript(tiny_model_dir, swarm, 11))
        flooder = Identity.generate()

        async def flood() -> list[str]:
            host = make_host(flooder)
            async with running_host(host, []):
                return [
                    (await send_audit(host, verifier.addrs[0], payload)).verdict for _ in range(8)
                ]

        assert swarm.loop.run(flood) == ["accepted"] * 3 + ["rate_limited"] * 5
        with auditing_client(tiny_model_dir, swarm, verifier.addrs[0]) as other:
            other.generate(prompt(12), max_new_tokens=6)  # two hops: two audits
            wait_until(lambda: other.swarm.auditor.pending == 0, timeout=30)
            stats = other.swarm.auditor.stats
            assert stats.accepted == stats.chosen == 2 and stats.refused == 0
            me = str(other.swarm.host.get_id())
            wait_until(lambda: sum(r.client == me for r in judged(verifier)) == 2, timeout=60)
        by_client = Counter(r.client for r in judged(verifier))
        assert by_client == {str(flooder.peer_id): 3, me: 2}
        assert all(r.outcome == PASS for r in judged(verifier))
        desk = verifier.verifier.audits
        assert desk.stats.refused == 5 and desk.stats.evicted == 0
    finally:
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()


class KillFirstHop:
    """A generate() streamer that kills the server of blocks 0:3 holding the session."""

    def __init__(self, swarm: LocalSwarm, after: int) -> None:
        self.swarm, self.after, self.seen, self.killed = swarm, after, 0, None

    def put(self, tokens: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.after:
            first = [
                s
                for s in self.swarm.servers
                if s.alive and s.server.span == (0, 3) and s.server.ctx.active_sessions
            ]
            self.killed = first[0]
            self.swarm.kill(self.killed)

    def end(self) -> None:
        pass


def test_sessions_ended_by_failover_are_audited(tiny_model_dir, tmp_path):
    swarm = LocalSwarm(tiny_model_dir)
    verifier = None
    try:
        for span in [(0, 3), (0, 3), (3, 6)]:
            swarm.start_server(span)
        verifier = audit_verifier(swarm, tmp_path)
        with auditing_client(tiny_model_dir, swarm, verifier.addrs[0], request_timeout=10) as c:
            killer = KillFirstHop(swarm, 3)
            c.generate(prompt(13), max_new_tokens=8, streamer=killer)
            assert killer.killed is not None
            wait_until(lambda: c.swarm.auditor.pending == 0, timeout=30)
            # The dead server's hop, the replacement's and the last span's: 3 transcripts.
            assert c.swarm.auditor.stats.accepted == 3
        wait_until(lambda: len(judged(verifier)) == 3, timeout=60)
        dead = [r for r in judged(verifier) if r.peer_id == killed_id(killer)]
        assert len(dead) == 1 and dead[0].outcome == PASS
        assert dead[0].steps == 3  # prefill + 2 steps answered before it died
    finally:
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()


def killed_id(killer: KillFirstHop) -> str:
    return killer.killed.peer_id
