"""Integration: redundancy=k against real tampering servers on a loopback swarm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.adversary import Tamper, adversarial_server_cls
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.client.agreement import DisagreementError
from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ModelDir
from trustswarm.protocol.comparator import compare
from trustswarm.protocol.evidence import DisagreementReport
from trustswarm.testing.local_swarm import LocalSwarm

pytestmark = pytest.mark.timeout(240)

FULL = (0, 6)
PROMPT = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(11))
TAMPERS = [
    Tamper("noise", amount=0.05),
    Tamper("scale", amount=0.05),
    Tamper("replay"),
    Tamper("skip_block"),
    Tamper("wrong_weights"),
    Tamper("quantized", bits=4),
]


@pytest.fixture(scope="module")
def local_model(tiny_model_dir: Path):
    hf = tiny_model_dir.parent / "hf"
    return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def honest_swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    for _ in range(3):
        swarm.start_server(FULL)
    yield swarm
    swarm.close()


def _client(swarm: LocalSwarm, model_dir: Path, k: int, **kwargs) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        model_dir, swarm.initial_peers, redundancy=k, **kwargs
    )


@pytest.fixture(scope="module")
def reference_hidden(tiny_model_dir: Path) -> torch.Tensor:
    """The span's output computed locally with the reference weights."""
    model_dir = ModelDir.open(tiny_model_dir)
    embeds = model_dir.load_client_parts().embed_tokens(PROMPT)
    return BlockRunner(model_dir, *FULL).forward(embeds).float()


def _remote_hidden(model: DistributedModelForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        embeds = model.get_input_embeddings()(PROMPT).float()
    positions = torch.arange(PROMPT.shape[1]).unsqueeze(0)
    mask = torch.ones_like(PROMPT)
    hidden, _ = model.run_async(model.passes.forward, embeds, positions, mask, *FULL)
    return hidden


def _prefer(model: DistributedModelForCausalLM, peer: str) -> None:
    """Make `peer` the cheapest server in the client's eyes (RTTs on loopback are noise)."""
    view = model.swarm.view
    for other in view.servers:
        view.rtts[other] = 0.0 if other == peer else 0.5


def _honest_tokens(local_model, new_tokens: int = 8) -> list[list[int]]:
    out = local_model.generate(
        PROMPT, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out.tolist()


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda t: t.kind)
def test_redundancy_3_outvotes_a_tampering_server(
    honest_swarm, tiny_model_dir, local_model, tamper
):
    # The adversary announces 100x its real speed, so routing picks it first.
    adversary = honest_swarm.start_server(FULL, server_cls=adversarial_server_cls(tamper, 100.0))
    try:
        with _client(honest_swarm, tiny_model_dir, 1) as single:
            _prefer(single, adversary.peer_id)
            assert single.swarm.view.inference_route(0, 6)[0].server.peer_id == adversary.peer_id
            cheated = _remote_hidden(single)
            # Proof that this test can fail: one server alone is believed. (Hidden states,
            # not logits: the final RMSNorm would hide a uniform scaling of the last span.)
            assert not compare(cheated, reference_hidden).agree

        with torch.no_grad():
            honest = local_model(input_ids=PROMPT).logits
        seen: list[DisagreementReport] = []
        with _client(honest_swarm, tiny_model_dir, 3, on_disagreement=seen.append) as model:
            _prefer(model, adversary.peer_id)
            assert model.generate(PROMPT, max_new_tokens=8).tolist() == _honest_tokens(local_model)
            with torch.no_grad():
                torch.testing.assert_close(
                    model(input_ids=PROMPT).logits, honest, atol=1e-4, rtol=0
                )
            events = model.trust_events
            assert events and events == seen
            first = events[0]
            assert first.minority == (adversary.peer_id,)
            assert adversary.peer_id not in first.majority and len(first.majority) == 2
            assert adversary.peer_id in model.swarm.view.banned_for_session
            # The evidence is real: the adversary's signature over its wrong answer.
            accused = next(a for a in first.answers if a.peer_id == adversary.peer_id)
            opened = accused.evidence.open()
            assert opened[-1].statement.server_peer_id == adversary.peer_id
            again = DisagreementReport.from_bytes(first.to_bytes())
            assert again.minority == first.minority and again.answers == first.answers
    finally:
        honest_swarm.kill(adversary)


def test_inference_evidence_is_the_whole_session(honest_swarm, tiny_model_dir):
    tamper = Tamper("noise", amount=0.05, fraction=1.0)
    adversary = honest_swarm.start_server(FULL, server_cls=adversarial_server_cls(tamper, 100.0))
    try:
        with _client(honest_swarm, tiny_model_dir, 3) as model:
            _prefer(model, adversary.peer_id)
            model.generate(PROMPT, max_new_tokens=3)
            inference = [e for e in model.trust_events if e.kind == "inference"]
            assert inference
            accused = next(a for a in inference[0].answers if a.peer_id == adversary.peer_id)
            steps = [o.statement.step for o in accused.evidence.open()]
            assert steps == list(range(len(steps)))
    finally:
        honest_swarm.kill(adversary)


def test_redundancy_2_escalates_to_a_third_server(tiny_model_dir, local_model):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        adversary = swarm.start_server(
            FULL, server_cls=adversarial_server_cls(Tamper("scale", 0.05), 100.0)
        )
        swarm.start_server(FULL)
        swarm.start_server(FULL)
        with _client(swarm, tiny_model_dir, 2) as model:
            _prefer(model, adversary.peer_id)
            tokens = model.generate(PROMPT, max_new_tokens=6).tolist()
            assert tokens == _honest_tokens(local_model, 6)
            report = model.trust_events[0]
            assert report.resolution == "escalation"
            assert report.minority == (adversary.peer_id,)
            assert len(report.answers) == 3
    finally:
        swarm.close()


def test_no_majority_and_no_spare_server_fails_loudly(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server(FULL, server_cls=adversarial_server_cls(Tamper("scale", 0.05)))
        swarm.start_server(FULL)
        with _client(swarm, tiny_model_dir, 2) as model:
            with pytest.raises(DisagreementError) as caught, torch.no_grad():
                model(input_ids=PROMPT)
            report = caught.value.report
            assert report.resolution == "unresolved" and report.accepted_cluster is None
            assert report.minority == () and len(report.answers) == 2
            assert model.trust_events == [report]
    finally:
        swarm.close()


def test_not_enough_servers_for_k_is_a_clear_error(honest_swarm, tiny_model_dir):
    with _client(honest_swarm, tiny_model_dir, 5) as model:
        assert len(model.swarm.view.usable()) == 3, sorted(model.swarm.view.servers)
        with pytest.raises(Exception, match="redundancy=5 needs 5 distinct servers"):
            with torch.no_grad():
                model(input_ids=PROMPT)


def test_bad_redundancy_is_refused(honest_swarm, tiny_model_dir):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="redundancy"):
            _client(honest_swarm, tiny_model_dir, bad)


def test_replica_failover_keeps_output(tiny_model_dir, local_model):
    """Kill a replica mid-generation: a spare replays the history and the vote goes on."""
    swarm = LocalSwarm(tiny_model_dir)
    try:
        servers = [swarm.start_server((0, 3)) for _ in range(3)]
        servers += [swarm.start_server((3, 6)) for _ in range(2)]
        with _client(swarm, tiny_model_dir, 2) as model:
            with model.inference_session(max_length=16) as session:
                embeds = model.get_input_embeddings()(PROMPT)
                mask = torch.ones(1, 5, dtype=torch.long)
                positions = torch.arange(5).unsqueeze(0)
                with torch.no_grad():
                    out = session.step(embeds, positions, mask)
                first_group = session.session.groups[0]
                victim = first_group.replicas[0].peer
                swarm.kill(next(s for s in servers if s.peer_id == victim))
                nxt = embeds[:, -1:]
                with torch.no_grad():
                    out2 = session.step(
                        nxt, torch.tensor([[5]]), torch.ones(1, 6, dtype=torch.long)
                    )
                peers = {r.peer for r in first_group.replicas}
                assert victim not in peers and len(peers) == 2
            with torch.no_grad():
                full = torch.cat([embeds, nxt], dim=1)
                ref = local_model.model(inputs_embeds=full).last_hidden_state
                ref_hidden = model.norm(torch.cat([out, out2], dim=1))
            torch.testing.assert_close(ref_hidden, ref, atol=1e-4, rtol=0)
            assert model.trust_events == []
    finally:
        swarm.close()


def test_replicas_prefer_distinct_hosts(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server(FULL)  # 127.0.0.1, fastest announced
        swarm.start_server(FULL)  # 127.0.0.1
        other = swarm.start_server(FULL, listen="/ip4/127.0.1.2/tcp/0")  # another /24: another network
        with _client(swarm, tiny_model_dir, 2) as model:
            with model.inference_session(max_length=8) as session:
                peers = {r.peer for r in session.session.groups[0].replicas}
            assert other.peer_id in peers
    finally:
        swarm.close()


def test_local_reference_settles_a_tie(tiny_model_dir, local_model, reference_hidden):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        adversary = swarm.start_server(
            FULL, server_cls=adversarial_server_cls(Tamper("noise", 0.05))
        )
        swarm.start_server(FULL)
        with _client(swarm, tiny_model_dir, 2, local_reference=True) as model:
            torch.testing.assert_close(_remote_hidden(model), reference_hidden, atol=1e-4, rtol=0)
            report = model.trust_events[0]
            assert report.resolution == "local" and report.minority == (adversary.peer_id,)
        with _client(swarm, tiny_model_dir, 2, local_reference=True) as model:
            assert model.generate(PROMPT, max_new_tokens=4).tolist() == _honest_tokens(
                local_model, 4
            )
            assert {e.resolution for e in model.trust_events} == {"local"}
    finally:
        swarm.close()


def test_backward_with_redundancy_outvotes_tampered_gradients(
    honest_swarm, tiny_model_dir, local_model
):
    tamper = Tamper("scale", amount=0.05, only="backward")
    adversary = honest_swarm.start_server(FULL, server_cls=adversarial_server_cls(tamper, 100.0))
    try:
        with _client(honest_swarm, tiny_model_dir, 3) as model:
            _prefer(model, adversary.peer_id)
            embeds = model.get_input_embeddings()(PROMPT).detach().requires_grad_(True)
            model(inputs_embeds=embeds, labels=PROMPT).loss.backward()
            local_embeds = local_model.get_input_embeddings()(PROMPT).detach()
            local_embeds.requires_grad_(True)
            local_model(inputs_embeds=local_embeds, labels=PROMPT).loss.backward()
            scale = local_embeds.grad.abs().max()
            torch.testing.assert_close(embeds.grad, local_embeds.grad, atol=1e-4 * scale, rtol=0)
            kinds = {e.kind for e in model.trust_events if adversary.peer_id in e.minority}
            assert kinds == {"backward"}
    finally:
        honest_swarm.kill(adversary)


def test_honest_float32_and_bfloat16_replicas_agree(tiny_model_dir, local_model):
    """Heterogeneous honest swarms are normal: their answers must not count as a dispute.
    Each answer is judged in the dtype its server sent (bfloat16: the looser tolerance)."""
    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server(FULL)
        swarm.start_server(FULL, dtype=torch.bfloat16)
        with _client(swarm, tiny_model_dir, 2) as model:
            tokens = model.generate(PROMPT, max_new_tokens=6).tolist()
            with torch.no_grad():
                logits = model(input_ids=PROMPT).logits
                honest = local_model(input_ids=PROMPT).logits
            assert model.trust_events == []
            # The float32 answer is the one carried on, so the output is exact.
            assert tokens == _honest_tokens(local_model, 6)
            torch.testing.assert_close(logits, honest, atol=1e-4, rtol=0)
    finally:
        swarm.close()


def test_a_segment_whose_servers_fail_to_open_is_cut_again(tiny_model_dir, local_model):
    """The client sees two full-span servers and cuts 0:6 as one segment for k=2; one of
    them is gone when the session opens. It is banned, and the blocks are cut again over
    the servers left (0:3 and 3:6 have two each), instead of failing the session."""
    swarm = LocalSwarm(tiny_model_dir)
    try:
        full = [swarm.start_server(FULL) for _ in range(2)]
        for span in ((0, 3), (0, 3), (3, 6), (3, 6)):
            swarm.start_server(span)
        with _client(swarm, tiny_model_dir, 2) as model:
            view = model.swarm.view
            assert view.segments(0, 6, 2) == [FULL]
            swarm.kill(full[1])
            ids = PROMPT
            out = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=[])
            with torch.no_grad():
                expected = local_model.generate(
                    ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids)
                )
            assert torch.equal(out, expected)
            assert full[1].peer_id in view.bans
    finally:
        swarm.close()
