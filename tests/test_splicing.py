"""Evidence bound to one real session (issue 10): a client that splices genuinely signed
steps of different sessions, reorders or drops steps, or mixes two servers' steps
cannot get an honest server banned. Real nodes and a real verifier on loopback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier, wait_until  # noqa: F401 - fixture
from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message
from trustswarm.protocol.evidence import Evidence, EvidenceError
from trustswarm.testing.local_swarm import LocalSwarm, raw_exchange
from trustswarm.testing.splicing import (
    CLIENT_PART,
    repeating_nonce_server_cls,
    splicing_client,
)
from trustswarm.verifier.config import ReportConfig
from trustswarm.verifier.daemon import VerifierConfig
from trustswarm.verifier.spotcheck import PASS, CheckConfig

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]

CONFIG = VerifierConfig(
    checks=CheckConfig(check_every=3600.0, inference_share=0.0, backward_share=0.0),
    reports=ReportConfig(max_reports=100),
)
SPAN = (1, 5)


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    swarm.target = swarm.start_server((0, 6))
    swarm.other = swarm.start_server((0, 6))
    # Honest, but draws the same nonce for every session: only the chain is left.
    swarm.repeater = swarm.start_server((0, 6), server_cls=repeating_nonce_server_cls())
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def verifier(swarm: LocalSwarm, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("verifier") / "v.db"
    running = start_verifier(swarm, f"sqlite:///{db}", CONFIG)
    wait_until(lambda: len(running.verifier.view.servers) == 3, timeout=20)
    yield running
    stop_verifier(swarm, running)


def state_of(verifier, server):  # noqa: ANN001, ANN201
    rep = verifier.store.get(server.peer_id, verifier.verifier.model_id)
    return None if rep is None else (rep.state, rep.passes, rep.failures)


def test_a_client_cannot_open_two_sessions_with_one_id(swarm):
    opening = Message(
        meta={
            "start": "0",
            "end": "6",
            "session_id": CLIENT_PART,
            "max_length": "8",
            "batch_size": "1",
        }
    )
    first, second = raw_exchange(swarm, swarm.target, protocols.INFERENCE, [opening, opening])
    assert first["opened"] != second["opened"]
    for reply in (first, second):
        assert reply["opened"] == f"{CLIENT_PART}.{reply['nonce']}"
        assert len(reply["nonce"]) == 32
    bad = Message(meta={**opening.meta, "session_id": "has.a.dot"})
    (reply,) = raw_exchange(swarm, swarm.target, protocols.INFERENCE, [bad])
    assert reply["error"] == "bad_request" and "session_id" in reply["message"]


@pytest.mark.parametrize("name", ["target", "repeater"])
def test_spliced_reports_are_rejected_and_the_honest_server_keeps_its_state(swarm, verifier, name):
    v = verifier.verifier
    server = getattr(swarm, name)
    # The server has a record first (one passed spot-check), so "keeps its state" means
    # something: state and counts (the score itself drifts with time).
    ann = v.view.servers[server.peer_id]
    assert swarm.loop.run(v.checker.check, ann).outcome == PASS
    before = state_of(verifier, server)
    assert before is not None and before[2] == 0
    other_before = state_of(verifier, swarm.other)
    target = server.server.announcement.announcement
    other = swarm.other.server.announcement.announcement

    async def attack():  # noqa: ANN202
        async with splicing_client(swarm.model_dir, swarm.initial_peers) as client:
            return await client.attack(target, other, *SPAN, verifier.addrs[0])

    sessions, results = swarm.loop.run(attack)

    # Both sessions on the server asked for the same id part. An honest server makes
    # the ids differ; the repeater does not, and then the chain alone tells.
    a, b, c = sessions
    assert (a.session_id == b.session_id) == (name == "repeater")
    assert all(s.session_id.startswith(CLIENT_PART + ".") for s in sessions)
    assert [len(s.exchanges) for s in sessions] == [3, 3, 3]

    by_name = {r.name: r for r in results}
    assert set(by_name) == {
        "genuine",
        "same id, other run",
        "spliced tail",
        "reordered",
        "middle step dropped",
        "not from step 0",
        "two servers",
    }
    for result in results:
        verdict = result.verdict
        assert verdict.verdict == "rejected" and verdict.banned == (), (result.name, verdict)
        if result.spliced:
            assert "rejected evidence" in verdict.detail, (result.name, verdict.detail)
        else:  # judged: recomputed, and an honest server's answers agree
            assert "agrees with the reference" in verdict.detail, verdict.detail
    for spliced in ("same id, other run", "spliced tail"):
        expected = "not chained" if name == "repeater" else "one server's session"
        assert expected in by_name[spliced].verdict.detail, by_name[spliced].verdict.detail
    assert "step 1" in by_name["reordered"].verdict.detail
    assert "step 2" in by_name["middle step dropped"].verdict.detail

    assert state_of(verifier, server) == before
    assert state_of(verifier, swarm.other) == other_before
    model_id = v.model_id
    assert not any(r.record.state == "banned" for r in verifier.store.published(model_id))


def test_each_real_session_opens_as_evidence_and_splices_do_not(swarm, verifier):
    """The same transcripts, opened locally: real sessions open step by step; a
    session's steps 1.. under another session's step 0 never do."""
    target = swarm.target.server.announcement.announcement

    async def record():  # noqa: ANN202
        async with splicing_client(swarm.model_dir, swarm.initial_peers, seed=5) as client:
            return [await client.record(target, *SPAN, 3, seed) for seed in (1, 2)]

    a, b = swarm.loop.run(record)
    for session in (a, b):
        opened = Evidence(session.exchanges).open()
        assert [o.statement.step for o in opened] == [0, 1, 2]
        assert {o.statement.session_id for o in opened} == {session.session_id}
        assert all(o.statement.dtype == "float32" for o in opened)
    spliced = dataclasses.replace(a, exchanges=(a.exchanges[0], *b.exchanges[1:]))
    with pytest.raises(EvidenceError, match="one server's session"):
        Evidence(spliced.exchanges).open()
