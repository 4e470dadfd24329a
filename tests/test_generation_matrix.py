"""transformers' generate through a real loopback swarm equals local transformers, on the
real SmolLM2-135M-Instruct (one swarm of 3 servers for the module).

What is compared: the returned token ids, exactly, for every configuration. For sampling,
both sides draw with the same seed and the same number of `torch.multinomial` calls of
the same shape per step (the decoding loop is transformers' own on both sides), and the
processed distributions (`output_scores`) are compared too (close, not bit-equal: the
swarm's float32 blocks are another computation of the same function).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.testing.local_swarm import LocalSwarm

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(300)]

PROMPTS = ["The capital of France is", "List three colors:"]


@pytest.fixture(scope="module")
def tok(real_model_dir: Path):
    return AutoTokenizer.from_pretrained(real_model_dir, padding_side="left")


@pytest.fixture(scope="module")
def swarm(real_model_dir: Path):
    running = LocalSwarm(real_model_dir)
    try:
        for span in [(0, 10), (10, 20), (20, 30)]:
            running.start_server(span)
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def model(swarm: LocalSwarm, real_model_dir: Path):
    with DistributedModelForCausalLM.from_pretrained(real_model_dir, swarm.initial_peers) as m:
        yield m


@pytest.fixture(scope="module")
def local(real_hf_model, model):
    # The same defaults on both sides: what is compared is the decoding, not two configs.
    real_hf_model.generation_config = GenerationConfig.from_dict(model.generation_config.to_dict())
    return real_hf_model


@pytest.fixture(autouse=True)
def no_leaked_sessions(swarm: LocalSwarm):
    yield
    deadline = time.monotonic() + 10
    while any(s.server.ctx.active_sessions for s in swarm.servers):
        assert time.monotonic() < deadline, "server sessions left open after generate"
        time.sleep(0.05)


def ids_of(tok, text: str = PROMPTS[0]) -> torch.Tensor:
    return tok(text, return_tensors="pt")["input_ids"]


def both(model, local, *args, **kwargs) -> tuple[list, list]:
    return model.generate(*args, **kwargs).tolist(), local.generate(*args, **kwargs).tolist()


def test_greedy(model, local, tok):
    remote, expected = both(model, local, ids_of(tok), max_new_tokens=12, do_sample=False)
    assert remote == expected


def test_sampling_with_seed_same_tokens_and_distributions(model, local, tok):
    opts = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    opts |= dict(return_dict_in_generate=True, output_scores=True)
    torch.manual_seed(1234)
    remote = model.generate(ids_of(tok), **opts)
    torch.manual_seed(1234)
    expected = local.generate(ids_of(tok), **opts)
    assert remote.sequences.tolist() == expected.sequences.tolist()
    for got, want in zip(remote.scores, expected.scores, strict=True):
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))  # the same tokens kept by top-k/p
        assert torch.allclose(got[finite], want[finite], atol=2e-3)


def test_beam_search_replays_reordered_rows(model, local, tok):
    remote, expected = both(model, local, ids_of(tok), max_new_tokens=8, num_beams=3)
    assert remote == expected


def test_beams_with_num_return_sequences(model, local, tok):
    opts = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)
    remote, expected = both(model, local, ids_of(tok, PROMPTS[1]), **opts)
    assert len(remote) == 2 and remote == expected


def test_sampling_num_return_sequences(model, local, tok):
    opts = dict(max_new_tokens=8, do_sample=True, num_return_sequences=3)
    torch.manual_seed(7)
    remote = model.generate(ids_of(tok), **opts).tolist()
    torch.manual_seed(7)
    assert remote == local.generate(ids_of(tok), **opts).tolist()


def test_min_new_tokens(model, local, tok):
    chat = [{"role": "user", "content": "Say yes."}]
    ids = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    remote, expected = both(model, local, ids, max_new_tokens=12, min_new_tokens=10)
    assert remote == expected
    assert len(remote[0]) - ids.shape[1] >= 10


def test_stop_strings(model, local, tok):
    opts = dict(max_new_tokens=12, stop_strings=[" is", "."], tokenizer=tok)
    remote, expected = both(model, local, ids_of(tok, PROMPTS[1]), **opts)
    assert remote == expected


def test_repetition_penalty(model, local, tok):
    remote, expected = both(model, local, ids_of(tok), max_new_tokens=12, repetition_penalty=1.8)
    assert remote == expected


def test_batch_with_left_padding(model, local, tok):
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    opts = dict(attention_mask=batch["attention_mask"], max_new_tokens=10)
    remote, expected = both(model, local, batch["input_ids"], **opts)
    assert remote == expected


def test_text_streamer_and_iterator_streamer(model, local, tok, capsys):
    ids = ids_of(tok)
    out = model.generate(ids, max_new_tokens=8, streamer=TextStreamer(tok, skip_prompt=True))
    assert out.tolist() == local.generate(ids, max_new_tokens=8).tolist()
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert capsys.readouterr().out.strip() == text.strip()
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(
        target=model.generate, args=(ids,), kwargs=dict(max_new_tokens=8, streamer=streamer)
    )
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert "".join(pieces) == text


def test_pipeline_text_generation(model, local, tok):
    prompt = PROMPTS[1]
    remote = pipeline("text-generation", model=model, tokenizer=tok)
    expected = pipeline("text-generation", model=local, tokenizer=tok)
    got = remote(prompt, max_new_tokens=10, do_sample=False)
    assert got == expected(prompt, max_new_tokens=10, do_sample=False)
    assert got[0]["generated_text"].startswith(prompt)


class BanTokens(LogitsProcessor):
    def __init__(self, banned: list[int]) -> None:
        self.banned = banned

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.banned] = -float("inf")
        return scores


def test_logits_processor(model, local, tok):
    ids = ids_of(tok)
    plain = local.generate(ids, max_new_tokens=6)[0, ids.shape[1] :].tolist()
    processors = LogitsProcessorList([BanTokens(plain[:2])])
    opts = dict(max_new_tokens=6, logits_processor=processors)
    remote, expected = both(model, local, ids, **opts)
    assert remote == expected
    assert not set(remote[0][ids.shape[1] :]) & set(plain[:2])


class StopAfter(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length)


def test_stopping_criteria(model, local, tok):
    ids = ids_of(tok)
    criteria = StoppingCriteriaList([StopAfter(ids.shape[1] + 4)])
    remote, expected = both(model, local, ids, max_new_tokens=12, stopping_criteria=criteria)
    assert remote == expected and len(remote[0]) == ids.shape[1] + 4


def test_generation_config_object(model, local, tok):
    config = GenerationConfig(
        max_new_tokens=10,
        no_repeat_ngram_size=2,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
    )
    remote, expected = both(model, local, ids_of(tok, PROMPTS[1]), generation_config=config)
    assert remote == expected
