"""Fraud reports to a real verifier (`/trustswarm/report/1`): an upheld report bans the
signer, a false or forged report changes nothing for the accused, bad input gets an
error frame and the verifier keeps serving, and reporters are rate-limited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.adversary import Tamper, adversarial_server_cls
from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier, wait_until  # noqa: F401 - fixture
from trustswarm.client.reports import ReportVerdict, send_report
from trustswarm.protocol.codec import Message, decode_message, encode_message
from trustswarm.protocol.digests import tensors_digest
from trustswarm.protocol.errors import RemoteError
from trustswarm.protocol.evidence import (
    DisagreementReport,
    Evidence,
    ReplicaAnswer,
    SignedExchange,
)
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.verifier.daemon import VerifierConfig
from trustswarm.verifier.probe import probe
from trustswarm.verifier.reports import BadReport, ReportConfig, evidence_report, parse_report
from trustswarm.verifier.spotcheck import CheckConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

CONFIG = VerifierConfig(
    checks=CheckConfig(check_every=3600.0),  # no spot-checks: only reports change anything
    reports=ReportConfig(max_reports=3, window=60.0),
)


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    swarm.honest = swarm.start_server((0, 6))
    swarm.cheat = swarm.start_server(
        (0, 6), server_cls=adversarial_server_cls(Tamper("noise", amount=0.05, fraction=1.0))
    )
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def verifier(swarm: LocalSwarm, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("verifier") / "v.db"
    running = start_verifier(swarm, f"sqlite:///{db}", CONFIG)
    wait_until(lambda: len(running.verifier.view.servers) == 2, timeout=20)
    yield running
    stop_verifier(swarm, running)


def evidence_from(swarm, verifier, server, inference: bool) -> Evidence:
    """What a client holds after asking `server` (blocks 1:5) once."""
    v = verifier.verifier
    kind = "inference" if inference else "forward"

    async def run() -> Evidence:
        challenge = await v.compute(v.checker.factory.make, 1, 5, 2 if inference else 0)
        ann = v.view.servers[server.peer_id]
        async with v.checker.pool.lease() as checker:  # a client of the swarm
            return await probe(checker.swarm, ann, challenge, kind)

    return swarm.loop.run(run)


def report(swarm, verifier, payload, identity: Identity | None = None) -> ReportVerdict:
    async def run() -> ReportVerdict:
        host = make_host(identity or Identity.generate())
        try:
            async with running_host(host, []):
                await host.connect(parse_peer_addr(verifier.addrs[0]))
                return await send_report(host, verifier.peer_id, payload, timeout=30.0)
        except BaseExceptionGroup as group:  # the host's nurseries wrap the error
            error: BaseException = group
            while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
                error = error.exceptions[0]
            raise error from None

    return swarm.loop.run(run)


def single(verifier, evidence: Evidence, kind: str) -> DisagreementReport:
    return evidence_report(verifier.verifier.model_id, 1, 5, kind, evidence)


def test_false_report_against_an_honest_server_changes_nothing(swarm, verifier):
    evidence = evidence_from(swarm, verifier, swarm.honest, inference=True)
    verdict = report(swarm, verifier, single(verifier, evidence, "inference"))
    assert verdict.verdict == "rejected" and verdict.banned == ()
    assert "agrees with the reference" in verdict.detail
    assert verifier.store.get(swarm.honest.peer_id, verifier.verifier.model_id) is None


def test_forged_report_is_rejected(swarm, verifier):
    """A wrong output under the honest server's name: the signature does not cover it."""
    (exchange,) = evidence_from(swarm, verifier, swarm.honest, inference=False).exchanges
    answer = decode_message(exchange.answer)
    wrong = answer.tensors["hidden_states"] * 1.5
    statement = json.loads(answer.meta["statement"])
    statement["output_digest"] = tensors_digest({"hidden_states": wrong})
    forged_meta = {**answer.meta, "statement": json.dumps(statement, sort_keys=True)}
    forged = encode_message(Message({"hidden_states": wrong}, forged_meta))
    evidence = Evidence((SignedExchange(exchange.request, forged),))
    verdict = report(swarm, verifier, single(verifier, evidence, "forward"))
    assert verdict.verdict == "rejected", verdict.detail
    assert "signature" in verdict.detail
    assert verifier.store.get(swarm.honest.peer_id, verifier.verifier.model_id) is None


def test_bad_input_gets_an_error_and_the_verifier_keeps_serving(swarm, verifier):
    with pytest.raises(RemoteError) as info:
        report(swarm, verifier, b"TSEV1\n\xff\xff\xff\xffgarbage")
    assert info.value.code == "bad_request" and "report" in info.value.message
    with pytest.raises(RemoteError):
        report(swarm, verifier, b"")
    evidence = evidence_from(swarm, verifier, swarm.honest, inference=False)
    assert report(swarm, verifier, single(verifier, evidence, "forward")).verdict == "rejected"


def test_upheld_report_bans_the_signer(swarm, verifier):
    """A redundancy-style report: two honest copies and the cheat's, the cheat accused."""
    cheat = evidence_from(swarm, verifier, swarm.cheat, inference=True)
    honest = evidence_from(swarm, verifier, swarm.honest, inference=True)
    disagreement = DisagreementReport(
        model_id=verifier.verifier.model_id,
        start=1,
        end=5,
        kind="inference",
        answers=(
            ReplicaAnswer(swarm.honest.peer_id, honest, 0),
            ReplicaAnswer(swarm.cheat.peer_id, cheat, 1),
        ),
        accepted_cluster=0,
        resolution="majority",
    )
    verdict = report(swarm, verifier, disagreement)
    assert verdict.verdict == "upheld", verdict.detail
    assert verdict.banned == (swarm.cheat.peer_id,)
    store, model_id = verifier.store, verifier.verifier.model_id
    assert store.get(swarm.cheat.peer_id, model_id).state == "banned"
    proof = DisagreementReport.from_bytes(store.ban_proof(swarm.cheat.peer_id, model_id))
    assert proof.answers[0].evidence.open()[0].statement.server_peer_id == swarm.cheat.peer_id
    assert store.get(swarm.honest.peer_id, model_id) is None  # the honest copy: untouched
    # The ban is published as a signed record.
    wait_until(
        lambda: any(
            r.record.subject == swarm.cheat.peer_id and r.record.state == "banned"
            for r in store.published(model_id)
        ),
        timeout=10,
    )


def test_reports_are_rate_limited_per_reporter(swarm, verifier):
    reporter = Identity.generate()
    evidence = evidence_from(swarm, verifier, swarm.honest, inference=False)
    payload = single(verifier, evidence, "forward")
    verdicts = [report(swarm, verifier, payload, reporter).verdict for _ in range(4)]
    assert verdicts == ["rejected", "rejected", "rejected", "rate_limited"]

    # Another reporter is not affected (and may name the verifier by its multiaddr).
    async def by_address() -> str:
        host = make_host(Identity.generate())
        async with running_host(host, []):
            return (await send_report(host, verifier.addrs[0], payload)).verdict

    assert swarm.loop.run(by_address) == "rejected"


def test_report_about_another_model_is_rejected(swarm, verifier):
    evidence = evidence_from(swarm, verifier, swarm.cheat, inference=False)
    other = evidence_report("another-model", 1, 5, "forward", evidence)
    verdict = report(swarm, verifier, other)
    assert verdict.verdict == "rejected" and verdict.banned == ()
    assert "checks" in verdict.detail


# -- the report parser: any bytes give a report or BadReport, never anything else ------

_VALID = DisagreementReport(
    model_id="m",
    start=0,
    end=2,
    kind="forward",
    answers=(ReplicaAnswer("peer", Evidence((SignedExchange(b"req", b"answer"),)), 0),),
    accepted_cluster=None,
    resolution="unresolved",
    created_at=1.0,
).to_bytes()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_parse_report_arbitrary_bytes(data: bytes):
    try:
        parse_report(data)
    except BadReport:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.integers(0, len(_VALID)))
def test_parse_report_mutations(position: int, value: int, cut: int):
    mutated = bytearray(_VALID)
    mutated[position] = value
    for data in (bytes(mutated), _VALID[:cut], _VALID + b"x"):
        try:
            report = parse_report(data)
        except BadReport:
            continue
        assert report.answers and report.kind in ("forward", "inference", "backward")


def test_parse_report_limits():
    assert parse_report(_VALID).answers[0].peer_id == "peer"
    with pytest.raises(BadReport, match="answers"):
        parse_report(_VALID, ReportConfig(max_answers=0))
    with pytest.raises(BadReport, match="exchanges"):
        parse_report(_VALID, ReportConfig(max_exchanges=0))
    with pytest.raises(BadReport):
        parse_report(_VALID, ReportConfig(max_bytes=len(_VALID) - 1))
