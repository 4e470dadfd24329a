"""Verifier spot-checks against a real loopback swarm (tiny model): honest servers are
credited only after comparison, a tampering server is banned with proof, checks come
from the verifier's few checker clients (never its own identity), and a server that
declines has refused the check: not scored, but it costs pick weight."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.adversary import Tamper, adversarial_server_cls
from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier, wait_until  # noqa: F401 - fixture
from trustswarm.node.config import ServerConfig
from trustswarm.protocol.evidence import DisagreementReport
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.verifier.challenges import ChallengeFactory
from trustswarm.verifier.daemon import VerifierConfig
from trustswarm.verifier.spotcheck import FRAUD, PASS, REFUSED, CheckConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

QUIET = CheckConfig(check_every=3600.0)  # the background loop stays idle; tests drive checks


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    swarm.honest = [
        swarm.start_server((0, 3)),
        swarm.start_server((3, 6)),
        swarm.start_server((1, 5), dtype=torch.bfloat16),  # honest, in lower precision
    ]
    swarm.cheat = swarm.start_server(
        (0, 6), server_cls=adversarial_server_cls(Tamper("noise", amount=0.05, fraction=1.0))
    )
    swarm.spy = swarm.start_server(  # honest answers; remembers which peers asked
        (0, 6), server_cls=adversarial_server_cls(Tamper("noise", fraction=0.0))
    )
    swarm.busy = swarm.start_server((0, 6), config=ServerConfig(max_sessions=0))
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def verifier(swarm: LocalSwarm, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("verifier") / "v.db"
    running = start_verifier(swarm, f"sqlite:///{db}", VerifierConfig(checks=QUIET))
    view = running.verifier.view
    wait_until(lambda: len(view.servers) == len(swarm.servers), timeout=20)
    yield running
    stop_verifier(swarm, running)


SHARES = {"forward": (0.0, 0.0), "inference": (1.0, 0.0), "backward": (0.0, 1.0)}


def check(swarm, verifier, server, kind: str):
    checker = verifier.verifier.checker
    inference, backward = SHARES[kind]
    checker.config = dataclasses.replace(
        checker.config, inference_share=inference, backward_share=backward
    )
    ann = verifier.verifier.view.servers[server.peer_id]
    return swarm.loop.run(checker.check, ann)


def test_challenges_are_real_hidden_states(verifier):
    factory: ChallengeFactory = verifier.verifier.checker.factory
    challenge = factory.make(3, 6, decode_steps=3)
    assert len(challenge.steps) == 4
    prefill, *decode = challenge.steps
    tokens = len(factory.tokens(challenge.prompt))
    assert prefill.hidden.shape == (1, tokens, factory.runner.hidden_size)
    assert [s.hidden.shape[1] for s in decode] == [1, 1, 1]
    assert challenge.steps[-1].mask.shape == (1, tokens + 3)
    # The span's input is the reference output of blocks 0:3 on the prompt's embeddings.
    ids = torch.tensor([factory.tokens(challenge.prompt)])
    expected = factory.runner.forward(factory.parts.embed_tokens(ids), end=3)
    torch.testing.assert_close(prefill.hidden, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(SHARES))
def test_honest_servers_are_credited_after_comparison(swarm, verifier, kind):
    store = verifier.store
    model_id = verifier.verifier.model_id
    for server in swarm.honest:
        before = store.get(server.peer_id, model_id)
        passes = before.passes if before else 0
        result = check(swarm, verifier, server, kind)
        assert result.outcome == PASS, result.detail
        assert result.kind == kind
        after = store.get(server.peer_id, model_id)
        assert (after.passes, after.failures, after.state) == (passes + 1, 0, "probation")
    rows = store.checks(swarm.honest[0].peer_id)
    assert rows and all(row.passed for row in rows)


@pytest.mark.parametrize("kind", list(SHARES))
def test_tampering_server_is_banned_with_proof(swarm, verifier, kind):
    store = verifier.store
    model_id = verifier.verifier.model_id
    result = check(swarm, verifier, swarm.cheat, kind)
    assert result.outcome == FRAUD, result.detail
    rep = store.get(swarm.cheat.peer_id, model_id)
    assert rep.state == "banned" and rep.passes == 0 and rep.score == 0
    proof = DisagreementReport.from_bytes(store.ban_proof(swarm.cheat.peer_id, model_id))
    (answer,) = proof.answers
    opened = answer.evidence.open()
    assert opened[-1].statement.server_peer_id == swarm.cheat.peer_id
    # A banned server is not picked for checks any more.
    picked = {a.peer_id for a, _ in verifier.verifier.checker.candidates()}
    assert swarm.cheat.peer_id not in picked


def test_checks_come_from_the_checker_clients(swarm, verifier):
    results = [
        check(swarm, verifier, swarm.spy, share) for share in ("forward", "inference", "backward")
    ]
    assert all(r.outcome == PASS for r in results), [r.detail for r in results]
    seen = swarm.spy.server.ctx.seen
    probers = {r.prober for r in results}
    pool = verifier.verifier.checker.pool
    assert probers <= seen and probers <= set(pool.identities)
    assert len(probers) <= pool.size
    assert verifier.peer_id not in seen


def test_a_server_that_declines_has_refused(swarm, verifier):
    checker = verifier.verifier.checker
    model_id = verifier.verifier.model_id
    result = check(swarm, verifier, swarm.busy, "inference")  # max_sessions=0: answers busy
    assert result.outcome == REFUSED and "busy" in result.detail
    assert verifier.store.get(swarm.busy.peer_id, model_id) is None  # no evidence either way
    assert checker.refusals.count(swarm.busy.peer_id, model_id) == 1
    weights = dict((a.peer_id, w) for a, w in checker.candidates())
    assert weights[swarm.busy.peer_id] < 0.6  # a server never checked has weight 1
