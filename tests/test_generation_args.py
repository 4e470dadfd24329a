"""transformers' generate on the tiny model through a real loopback swarm: bad
arguments give clear errors, sessions are closed, beams equal local transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.client.generation import GenerationArgumentError
from trustswarm.testing.local_swarm import LocalSwarm

IDS = torch.tensor([[5, 6, 7, 8]])


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server((0, 3))
        swarm.start_server((3, 6))
        with DistributedModelForCausalLM.from_pretrained(tiny_model_dir, swarm.initial_peers) as m:
            yield swarm, m
    finally:
        swarm.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(use_cache=False), "use_cache=False"),
        (dict(past_key_values=DynamicCache()), "past_key_values"),
        (dict(cache_implementation="static"), "cache_implementation"),
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup"),
        (dict(generation_config={"max_new_tokens": 3}), "GenerationConfig"),
    ],
)
def test_bad_arguments_are_refused(setup, kwargs, message):
    _, model = setup
    with pytest.raises(GenerationArgumentError, match=message):
        model.generate(IDS, **kwargs)


def test_bad_inputs_and_unknown_kwargs(setup):
    _, model = setup
    with pytest.raises(GenerationArgumentError, match="at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="not used by the model"):  # transformers' check
        model.generate(IDS, max_new_tokens=2, no_such_option=1)


def test_beams_equal_local_and_no_session_is_left_open(setup, tiny_model_dir):
    swarm, model = setup
    local = AutoModelForCausalLM.from_pretrained(tiny_model_dir.parent / "hf").eval()
    ids = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(4))
    for kwargs in [dict(num_beams=4, num_return_sequences=2), dict(min_new_tokens=6)]:
        opts = dict(max_new_tokens=6, pad_token_id=0, **kwargs)
        assert model.generate(ids, **opts).tolist() == local.generate(ids, **opts).tolist()
    assert not any(s.server.ctx.active_sessions for s in swarm.servers)


def test_empty_eos_list_never_stops(setup):
    _, model = setup
    out = model.generate(IDS, max_new_tokens=5, eos_token_id=[])
    assert out.shape == (1, 9)
