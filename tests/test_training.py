"""Integration: training through a real loopback swarm (backward RPC, prompt tuning, failover).

Tolerance for gradients: atol = 1e-4 * max|local gradient|, rtol 0. Both sides compute
in float32 with the same weights but in a different association order (the servers run
each span's blocks separately, the hidden states cross the wire as float32, the server
recomputes the forward before its backward), so elementwise agreement is at float32
rounding (~1e-6 relative per op, ~1e-5 after a few dozen ops); 1e-4 of the gradient's
scale leaves an order of magnitude of slack while still failing for any real error
(a wrong mask, position or a missing hop changes gradients at the 1e-1 scale).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.client.model import default_positions
from trustswarm.client.ptune import TuningConfigError
from trustswarm.node.config import ServerConfig
from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message, encode_message
from trustswarm.protocol.limits import Limits
from trustswarm.testing.local_swarm import LocalSwarm, raw_exchange

pytestmark = pytest.mark.timeout(180)
PRE_SEQ_LEN = 4
HIDDEN = 64  # tests/tiny_model.py


def assert_grad_close(remote: torch.Tensor, local: torch.Tensor) -> None:
    scale = local.abs().max()
    assert scale > 0
    torch.testing.assert_close(remote / scale, local / scale, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    for span in [(0, 2), (2, 4), (4, 6)]:
        swarm.start_server(span)
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def ptune(swarm: LocalSwarm, tiny_model_dir: Path):
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_model_dir, swarm.initial_peers, tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN
    )
    yield model
    model.close()


@pytest.fixture(scope="module")
def local_model(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir.parent / "hf", dtype=torch.float32)
    return model.eval().requires_grad_(False)


def local_prompted(local_model, prompt, embeds, mask, labels):
    """The HF model on [soft prompt; tokens], positions as HF's generate derives them."""
    batch = embeds.shape[0]
    full_mask = torch.cat([torch.ones(batch, prompt.shape[0], dtype=torch.long), mask], 1)
    return local_model(
        inputs_embeds=torch.cat([prompt.expand(batch, -1, -1), embeds], 1),
        attention_mask=full_mask,
        position_ids=default_positions(full_mask),
        labels=torch.cat([torch.full((batch, prompt.shape[0]), -100), labels], 1),
    )


@pytest.mark.parametrize(
    ("mode", "length"),
    [
        ("lora", 4),
        ("PTUNE", 4),
        ("ptune", 0),
        ("ptune", -3),
        ("ptune", None),
        ("ptune", 2.5),
        ("ptune", True),
        (None, 8),
    ],
)
def test_bad_tuning_options_are_refused_before_connecting(tiny_model_dir, mode, length):
    with pytest.raises(TuningConfigError) as info:
        # No such peer: the options must be refused before any connection is tried.
        DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir,
            ["/ip4/127.0.0.1/tcp/9/p2p/QmNoSuchPeer"],
            tuning_mode=mode,
            pre_seq_len=length,
        )
    assert isinstance(info.value, ValueError)
    assert "tuning_mode" in str(info.value) or "pre_seq_len" in str(info.value)


def test_only_the_soft_prompt_is_trainable(ptune):
    trainable = [name for name, p in ptune.named_parameters() if p.requires_grad]
    assert trainable == ["soft_prompt.embeddings"]
    assert ptune.soft_prompt.embeddings.shape == (PRE_SEQ_LEN, HIDDEN)


def test_gradients_wrt_embeddings_and_prompt_equal_local_autograd(ptune, local_model):
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(11))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    labels = ids.masked_fill(mask == 0, -100)
    embeds = ptune.get_input_embeddings()(ids).detach().requires_grad_(True)
    ptune.soft_prompt.zero_grad()
    out = ptune(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert out.logits.shape == (2, 7, 512)  # real tokens only

    prompt = ptune.soft_prompt.embeddings.detach().clone().requires_grad_(True)
    local_embeds = embeds.detach().clone().requires_grad_(True)
    local = local_prompted(local_model, prompt, local_embeds, mask, labels)
    local.loss.backward()

    torch.testing.assert_close(out.loss, local.loss, atol=1e-5, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(
        out.logits[real], local.logits[:, PRE_SEQ_LEN:][real], atol=1e-4, rtol=0
    )
    assert_grad_close(ptune.soft_prompt.embeddings.grad, prompt.grad)
    assert_grad_close(embeds.grad[real], local_embeds.grad[real])


def test_prompt_tuning_steps_equal_local_steps(ptune, local_model):
    ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    start = torch.randn(PRE_SEQ_LEN, HIDDEN, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        ptune.soft_prompt.embeddings.copy_(start)
    local_prompt = torch.nn.Parameter(start.clone())
    remote_opt = torch.optim.SGD(ptune.soft_prompt.parameters(), lr=5.0, momentum=0.9)
    local_opt = torch.optim.SGD([local_prompt], lr=5.0, momentum=0.9)
    embeds = local_model.get_input_embeddings()(ids)
    remote_losses, local_losses = [], []
    for _ in range(4):
        remote_opt.zero_grad()
        loss = ptune(input_ids=ids, labels=ids).loss
        loss.backward()
        remote_opt.step()
        remote_losses.append(loss.item())
        local_opt.zero_grad()
        local_loss = local_prompted(local_model, local_prompt, embeds, mask, ids).loss
        local_loss.backward()
        local_opt.step()
        local_losses.append(local_loss.item())
    moved = (local_prompt.detach() - start).abs().max()
    assert moved > 0.1  # the steps did change the prompt
    assert remote_losses[-1] < remote_losses[0]
    torch.testing.assert_close(
        torch.tensor(remote_losses), torch.tensor(local_losses), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        ptune.soft_prompt.embeddings.detach(),
        local_prompt.detach(),
        atol=1e-4 * float(moved),
        rtol=0,
    )


def test_generate_with_soft_prompt_equals_local(ptune, local_model):
    ids = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(14))
    remote = ptune.generate(ids, max_new_tokens=8)
    prompt = ptune.soft_prompt.embeddings.detach()
    embeds = torch.cat([prompt.expand(2, -1, -1), local_model.get_input_embeddings()(ids)], 1)
    local = local_model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(2, PRE_SEQ_LEN + 5, dtype=torch.long),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert remote[:, :5].tolist() == ids.tolist()
    assert remote[:, 5:].tolist() == local.tolist()
    # The prompt matters: without it, the continuation differs.
    with torch.no_grad():
        plain = local_model.generate(
            ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert plain[:, 5:].tolist() != remote[:, 5:].tolist()


# -- failover between forward and backward ------------------------------------------------


def served(server) -> int:
    return server.server.ctx.served_requests


def test_backward_fails_over_when_a_server_dies_after_forward(tiny_model_dir, local_model):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        whole, first, second, first_again = (
            swarm.start_server(span) for span in [(0, 6), (0, 3), (3, 6), (0, 3)]
        )
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir, swarm.initial_peers, request_timeout=10
        ) as model:
            view = model.swarm.view
            assert len(view.servers) == 4

            def check(steer: set[str], victim) -> None:
                ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(15))
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                before = served(victim)
                view.banned_for_session |= steer  # steer the forward route only
                loss = model(inputs_embeds=embeds, labels=ids).loss
                view.banned_for_session -= steer
                assert served(victim) == before + 1, "the forward did not use the victim"
                swarm.kill(victim)
                loss.backward()
                assert victim.peer_id in view.bans
                local_embeds = embeds.detach().clone().requires_grad_(True)
                local_model(inputs_embeds=local_embeds, labels=ids).loss.backward()
                assert_grad_close(embeds.grad, local_embeds.grad)

            # 1. The whole-model server dies: no single server covers 0:6 any more, the
            #    client re-runs the forward over 0:3 + 3:6 and goes back through them.
            check({first.peer_id, second.peer_id, first_again.peer_id}, whole)
            assert served(second) == 2  # re-run forward + backward
            assert served(first) + served(first_again) == 2
            # 2. A 0:3 server dies: its twin gets the backward (it recomputes the forward).
            before = served(first_again), served(second)
            check({first_again.peer_id}, first)
            assert served(first_again) == before[0] + 1  # backward only
            assert served(second) == before[1] + 2  # forward + backward
    finally:
        swarm.close()


# -- bad input to the backward RPC --------------------------------------------------------


def backward_request(hidden, grad, start=0, end=2) -> Message:
    return Message(
        tensors={"hidden_states": hidden, "grad_outputs": grad},
        meta={"start": str(start), "end": str(end)},
    )


def frame_with_nan(hidden, grad) -> bytes:
    """A well-formed backward frame whose gradient holds a NaN (our encoder refuses it)."""
    marker = struct.pack("<f", 1234.5)
    grad = grad.clone()
    grad[0, 0, 0] = 1234.5
    payload = encode_message(backward_request(hidden, grad))
    assert payload.count(marker) == 1
    payload = payload.replace(marker, struct.pack("<f", float("nan")))
    return struct.pack("!I", len(payload)) + payload


def test_bad_backward_requests_get_clear_errors_and_server_keeps_serving(swarm, local_model):
    limited = swarm.start_server(
        (0, 2), config=ServerConfig(max_tokens_per_request=16, limits=Limits(max_elements=4096))
    )
    try:
        gen = torch.Generator().manual_seed(16)
        h = torch.randn(1, 3, HIDDEN, generator=gen)
        g = torch.randn(1, 3, HIDDEN, generator=gen)
        cases = [
            (backward_request(h, torch.randn(1, 4, HIDDEN)), "bad_request", "grad_outputs"),
            (backward_request(h, torch.randn(1, 3, 32)), "bad_request", "grad_outputs"),
            (backward_request(h, torch.randn(3, HIDDEN)), "bad_request", "grad_outputs"),
            (backward_request(h, g.long()), "bad_request", "grad_outputs"),
            (backward_request(h, torch.randn(1, 100, HIDDEN)), "too_large", "4096"),
            (
                backward_request(torch.randn(1, 20, HIDDEN), torch.randn(1, 20, HIDDEN)),
                "too_large",
                "tokens",
            ),
            (
                Message(tensors={"hidden_states": h}, meta={"start": "0", "end": "2"}),
                "bad_request",
                "grad_outputs",
            ),
            (backward_request(h, g, 0, 4), "bad_request", "served span"),
            (frame_with_nan(h, g), "bad_request", "NaN"),
        ]
        replies = raw_exchange(swarm, limited, protocols.BACKWARD, [c[0] for c in cases])
        for (_, code, text), reply in zip(cases, replies, strict=True):
            assert reply.get("error") == code, reply
            assert text in reply["message"], reply
        # Still serving, and right: a good request after the bad ones.
        (good,) = raw_exchange(swarm, limited, protocols.BACKWARD, [backward_request(h, g)])
        assert "error" not in good, good
        assert json.loads(good["statement"])["kind"] == "backward"
    finally:
        swarm.kill(limited)
