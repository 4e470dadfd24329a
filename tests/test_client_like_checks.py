"""Spot-checks that are clients (issue 11), on a real loopback swarm (tiny model) with a
real verifier: each cheater that recognises checks by one signal a check now produces
(it reuses its connection and opens several streams, follows reputation gossip, stays
connected, runs generations past step 7) is banned by spot-checks within a bounded
number of checks, so is one that cheats on 2 % of its answers; the checks come from a
few long-lived checker clients; honest float32 and bfloat16 servers are never penalised;
a server answering `busy` to every check loses pick weight and the confidence of its
score."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier, wait_until  # noqa: F401 - fixture
from trustswarm.node.config import ServerConfig
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.testing.recognising import (
    Asker,
    connection_age_cheater,
    gossip_cheater,
    late_step_cheater,
    rare_cheater,
    recognising_server_cls,
    stream_reuse_cheater,
)
from trustswarm.verifier.daemon import VerifierConfig
from trustswarm.verifier.spotcheck import FRAUD, PASS, REFUSED, CheckConfig

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

# Default check mix and generation lengths; the background loop stays idle (tests drive
# the checks); two checker clients that live longer than the module.
CHECKS = CheckConfig(check_every=3600.0, checkers=2, checker_lifetime=3600.0)
AGE = 2.0  # the connection-age cheater's threshold, shortened from 20 s
BOUND = 25  # checks within which a signal cheater must be banned
RARE_BOUND = 80  # and the 2 % cheater (about 15 % of checks hold a tampered answer)
CHEATERS = {
    "stream_reuse": stream_reuse_cheater,
    "gossip": gossip_cheater,
    "connection_age": lambda: connection_age_cheater(AGE),
    "late_step": late_step_cheater,
}
WATCHED: list[Asker] = []


def _watch(asker: Asker) -> bool:
    WATCHED.append(asker)
    return False


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    swarm.honest = [
        swarm.start_server((0, 3)),
        swarm.start_server((3, 6)),
        swarm.start_server((1, 5), dtype=torch.bfloat16),
    ]
    swarm.cheaters = {
        name: swarm.start_server((0, 6), server_cls=make()) for name, make in CHEATERS.items()
    }
    swarm.rare = swarm.start_server((0, 6), server_cls=rare_cheater(0.02, seed=3))
    swarm.watcher = swarm.start_server((0, 6), server_cls=recognising_server_cls(_watch, "watch"))
    swarm.busy = swarm.start_server((0, 6), config=ServerConfig(max_sessions=0))
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def verifier(swarm: LocalSwarm, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("verifier") / "v.db"
    running = start_verifier(swarm, f"sqlite:///{db}", VerifierConfig(checks=CHECKS))
    view = running.verifier.view
    wait_until(lambda: len(view.servers) == len(swarm.servers), timeout=30)
    yield running
    stop_verifier(swarm, running)


def check(swarm, verifier, server, **shares):
    checker = verifier.verifier.checker
    checker.config = dataclasses.replace(CHECKS, **shares)
    ann = verifier.verifier.view.servers[server.peer_id]
    result = swarm.loop.run(checker.check, ann)
    verifier.verifier.results.append(result)
    return result


def until_fraud(swarm, verifier, server, bound: int) -> int:
    """Check `server` with the default mix until a check proves fraud; how many it took."""
    for n in range(1, bound + 1):
        result = check(swarm, verifier, server)
        assert result.outcome in (PASS, FRAUD), result.detail
        if result.outcome == FRAUD:
            return n
    raise AssertionError(f"not caught in {bound} checks ({server.server.tampered} tampered)")


@pytest.mark.parametrize("name", list(CHEATERS))
def test_a_cheater_recognising_checks_is_banned(swarm, verifier, name):
    cheat = swarm.cheaters[name]
    checks = until_fraud(swarm, verifier, cheat, BOUND)
    rep = verifier.store.get(cheat.peer_id, verifier.verifier.model_id)
    assert rep.state == "banned"
    fired = cheat.server.ctx.fired_for
    assert set(fired) <= set(verifier.verifier.checker.pool.identities)
    print(f"\n[client-like checks] {name}: banned after {checks} check(s)")


def test_a_cheater_on_two_percent_of_answers_is_banned(swarm, verifier):
    checks = until_fraud(swarm, verifier, swarm.rare, RARE_BOUND)
    print(f"\n[client-like checks] 2 % cheater: banned after {checks} check(s)")


def test_checks_look_like_a_few_clients(swarm, verifier):
    """What the server sees: a few peers it saw before, subscribed to reputation gossip,
    on connections that stay open, with generations of client-like lengths."""
    WATCHED.clear()
    results = [check(swarm, verifier, swarm.watcher) for _ in range(16)]
    assert all(r.outcome == PASS for r in results), [r.detail for r in results]
    pool = verifier.verifier.checker.pool
    peers = {a.peer for a in WATCHED}
    assert peers <= set(pool.identities) and len(peers) <= pool.size
    assert verifier.peer_id not in peers
    assert all(a.subscribed for a in WATCHED)
    assert max(a.work_streams for a in WATCHED) > 1
    assert max(a.connection_age for a in WATCHED) > AGE
    steps = [r.exchanges - 1 for r in results if r.kind == "inference"]
    assert steps and len(set(steps)) > 1  # lengths are drawn, not one fixed session


def test_honest_servers_are_never_penalised(swarm, verifier):
    for server in swarm.honest:
        for _ in range(6):
            result = check(swarm, verifier, server)
            assert result.outcome == PASS, result.detail
    model_id = verifier.verifier.model_id
    refusals = verifier.verifier.checker.refusals
    for server in swarm.honest:
        rep = verifier.store.get(server.peer_id, model_id)
        assert rep.failures == 0 and rep.state != "banned"
        assert refusals.count(server.peer_id, model_id) == 0


def test_a_server_busy_for_every_check_loses_weight_and_confidence(swarm, verifier):
    v, busy = verifier.verifier, swarm.busy
    checker = v.checker

    def weight() -> float:
        return dict((a.peer_id, w) for a, w in checker.candidates())[busy.peer_id]

    for _ in range(6):  # it answers forward passes (max_sessions=0 refuses sessions only)
        assert check(swarm, verifier, busy, inference_share=0.0, backward_share=0.0).outcome == PASS
    before = v.record_for(busy.peer_id).record
    assert before.state == "ok"
    weights = [weight()]
    for _ in range(8):  # every check an inference session: busy
        result = check(swarm, verifier, busy, inference_share=1.0, backward_share=0.0)
        assert result.outcome == REFUSED and "busy" in result.detail
        weights.append(weight())
    # Not step by step: the weights are relative to the other servers', which the
    # verifier's own background checks change meanwhile, and refusals decay with time.
    assert weights[-1] < weights[0] / 2, weights
    after = v.record_for(busy.peer_id).record
    assert after.state == "probation" and after.score < before.score
    print(
        f"\n[client-like checks] busy server, 8 refusals: pick weight {weights[0]:.3f} -> "
        f"{weights[-1]:.3f}, {before.state} {before.score:.2f} -> {after.state} {after.score:.2f}"
    )
    # It now keeps refusing: together such servers get at most max_refusing_share.
    total = sum(w for _, w in checker.candidates())
    assert weights[-1] / total <= CHECKS.max_refusing_share + 1e-9


def test_checker_identities_rotate(swarm, tmp_path):
    """Each checker lives a while, then a new identity takes its place (its successor
    joins before it retires): a few clients at a time, not one identity per check."""
    config = VerifierConfig(checks=dataclasses.replace(CHECKS, checker_lifetime=3.0))
    running = start_verifier(swarm, f"sqlite:///{tmp_path / 'rotating.db'}", config, seed=1)
    try:
        pool = running.verifier.checker.pool
        wait_until(lambda: len(pool.identities) >= 2 * pool.size, timeout=60)
        wait_until(lambda: len(pool.ready()) == pool.size, timeout=30)
        honest = swarm.honest[0]
        result = swarm.loop.run(
            running.verifier.checker.check, running.verifier.view.servers[honest.peer_id]
        )
        assert result.outcome == PASS, result.detail
        assert result.prober in set(pool.identities)
    finally:
        stop_verifier(swarm, running)
