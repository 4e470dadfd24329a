"""Client audits (issue 11) with real nodes and a real verifier on loopback (tiny model):
a cheater no spot-check sees is banned through a client's audits; honest float32 and
bfloat16 servers audited many times are never penalised; an audit never blocks the
client; quotas refuse a flooding client without disturbing others; sessions ended by
failover are audited. The rules themselves: tests/test_audit_rules.py."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import trio

from tests.adversary import Tamper, adversarial_server_cls
from tests.verifier_env import (  # noqa: F401 - fixture
    RunningVerifier,
    one_torch_thread,
    start_verifier,
    stop_verifier,
    wait_until,
)
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.client.audits import audit_payload, send_audit
from trustswarm.protocol.evidence import DisagreementReport, Evidence
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host, running_host
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.verifier.audits import FRAUD, INCONCLUSIVE, PASS, AuditResult
from trustswarm.verifier.config import AuditConfig, CheckConfig, VerifierConfig

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_torch_thread")]

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


@pytest.mark.timeout(600)  # ~50 s alone; minutes on a loaded machine
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

        port = swarm.loop.run(lambda: swarm.start_task(blackhole))
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
        if tokens.dim() == 2:  # the prompt: transformers' generate streams it first
            return
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
