"""End to end with the real SmolLM2-135M-Instruct: the swarm answers like local HF."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.testing.local_swarm import LocalSwarm

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(300)]


def test_swarm_greedy_chat_answer_equals_local(real_model_dir: Path, real_hf_model):
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    chat = [{"role": "user", "content": "Name three primary colors."}]
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    local = real_hf_model.generate(ids, max_new_tokens=24, do_sample=False)
    swarm = LocalSwarm(real_model_dir)
    try:
        for span in [(0, 10), (10, 20), (20, 30)]:
            swarm.start_server(span)
        with DistributedModelForCausalLM.from_pretrained(
            real_model_dir, swarm.initial_peers
        ) as model:
            remote = model.generate(ids, max_new_tokens=24, do_sample=False)
    finally:
        swarm.close()
    answer = tokenizer.decode(remote[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"\nswarm answer: {answer!r}")
    assert remote.tolist() == local.tolist()
    assert answer.strip()
