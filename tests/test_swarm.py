"""Integration: a real 3-server swarm on loopback with a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.protocol import protocols
from trustswarm.testing.local_swarm import LocalSwarm, raw_exchange

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    for span in [(0, 2), (2, 4), (4, 6)]:
        swarm.start_server(span)
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def client(swarm: LocalSwarm, tiny_model_dir: Path):
    model = DistributedModelForCausalLM.from_pretrained(tiny_model_dir, swarm.initial_peers)
    yield model
    model.close()


@pytest.fixture(scope="module")
def local_model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dir.parent / "hf", dtype=torch.float32
    ).eval()


def test_client_discovers_all_servers(client: DistributedModelForCausalLM, swarm: LocalSwarm):
    assert set(client.swarm.view.servers) == {s.peer_id for s in swarm.servers}


def test_logits_equal_local(client, local_model):
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        remote = client(input_ids=ids).logits
        local = local_model(input_ids=ids).logits
    torch.testing.assert_close(remote, local, atol=1e-4, rtol=0)


def test_logits_with_padding_and_inputs_embeds(client, local_model):
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        embeds = client.get_input_embeddings()(ids)
        remote = client(inputs_embeds=embeds, attention_mask=mask).logits
        local = local_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(remote[mask.bool()], local[mask.bool()], atol=1e-4, rtol=0)


def test_greedy_generate_equals_local(client, local_model):
    ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    remote = client.generate(ids, max_new_tokens=12, do_sample=False)
    local = local_model.generate(
        ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert remote.tolist() == local.tolist()


def test_batched_generate_with_left_padding_equals_local(client, local_model):
    ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ids = ids.masked_fill(mask == 0, 0)
    remote = client.generate(ids, attention_mask=mask, max_new_tokens=8)
    local = local_model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert remote.tolist() == local.tolist()


def test_sampling_is_seeded_and_in_vocab(client):
    ids = torch.randint(3, 512, (1, 4), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    a = client.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(0)
    b = client.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8)
    assert a.tolist() == b.tolist() and a.shape == (1, 10) and int(a.max()) < 512


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00\x00\x04abcd",  # frame whose message is garbage
        b"\xff\xff\xff\xff",  # frame length over the limit
        b"\x00\x00\x00\x10" + (2**40).to_bytes(8, "little") + b"\x00" * 8,  # huge header
    ],
)
def test_malformed_frame_gets_error_and_server_keeps_serving(swarm, client, local_model, payload):
    target = swarm.servers[0]

    (meta,) = raw_exchange(swarm, target, protocols.FORWARD, [payload])
    assert meta["error"] in {"bad_request", "too_large"}
    assert meta["message"]
    test_logits_equal_local(client, local_model)


def test_backward_through_the_swarm_matches_local_autograd(client, local_model):
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(6))
    embeds = client.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = client(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    local_embeds = embeds.detach().clone().requires_grad_(True)
    local_loss = local_model(inputs_embeds=local_embeds, labels=ids).loss
    local_loss.backward()
    torch.testing.assert_close(loss, local_loss, atol=1e-5, rtol=0)
    scale = local_embeds.grad.abs().max()
    torch.testing.assert_close(embeds.grad / scale, local_embeds.grad / scale, atol=1e-4, rtol=0)
