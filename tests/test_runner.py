"""The block runner against the local HF model: forward, KV-cache steps, backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trustswarm.models.runner import BlockRunner, RunnerError
from trustswarm.models.store import ClientParts, ModelDir

SPANS = [(0, 2), (2, 4), (4, 6)]
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> ModelDir:
    return ModelDir.open(tiny_model_dir)


@pytest.fixture(scope="module")
def runners(model_dir: ModelDir) -> list[BlockRunner]:
    return [BlockRunner(model_dir, s, e) for s, e in SPANS]


@pytest.fixture(scope="module")
def parts(model_dir: ModelDir) -> ClientParts:
    return model_dir.load_client_parts()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dir.parent / "hf", local_files_only=True
    ).eval()


def _batch(seed: int = 0, t: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [3, t], a left-padding mask, and the positions HF generate would use."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (3, t), generator=g)
    mask = torch.ones(3, t, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _chain(runners, h, **kw) -> torch.Tensor:
    for r in runners:
        h = r.forward(h, **kw)
    return h


def test_runner_attributes(model_dir: ModelDir, runners: list[BlockRunner]) -> None:
    r = runners[1]
    assert (r.start, r.end, r.hidden_size, r.dtype) == (2, 4, 64, torch.float32)
    assert r.weights_digest == model_dir.manifest.span_digest(2, 4)


@pytest.mark.parametrize("padded", [False, True])
def test_spans_reproduce_hf_logits(runners, parts, hf_model, padded: bool) -> None:
    ids, mask, positions = _batch()
    kw = {"attention_mask": mask, "position_ids": positions} if padded else {}
    with torch.inference_mode():
        ref = hf_model(input_ids=ids, **kw).logits
        logits = parts.lm_head(parts.norm(_chain(runners, parts.embed_tokens(ids), **kw)))
    keep = mask.bool() if padded else torch.ones_like(mask, dtype=torch.bool)
    torch.testing.assert_close(logits[keep], ref[keep], rtol=0, atol=ATOL)
    assert torch.isfinite(logits).all()  # pad rows too: they go on the wire
    if padded:  # the mask really matters for the padded rows
        with torch.inference_mode():
            unmasked = parts.lm_head(parts.norm(_chain(runners, parts.embed_tokens(ids))))
        assert not torch.allclose(unmasked[1, 3:], ref[1, 3:], atol=1e-3)


def test_bfloat16_runner(model_dir: ModelDir, runners) -> None:
    h = torch.randn(2, 5, 64)
    r16 = BlockRunner(model_dir, 0, 2, dtype=torch.bfloat16)
    out = r16.forward(h)
    assert out.dtype == torch.bfloat16
    ref = runners[0].forward(h)
    assert (out.float() - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("padded", [False, True])
def test_cache_steps_match_stateless(runners, parts, padded: bool) -> None:
    ids, mask, positions = _batch(seed=1)
    if not padded:
        mask, positions = torch.ones_like(mask), None
    h = parts.embed_tokens(ids)
    full_kw = {"attention_mask": mask if padded else None, "position_ids": positions}
    for r in runners:
        ref = r.forward(h, **full_kw)

        def pos(a: int, b: int):
            return None if positions is None else positions[:, a:b]

        def am(b: int):
            return mask[:, :b] if padded else None

        # Prefill 5 tokens, then 4 single decode steps.
        cache = r.new_cache(batch_size=3, max_length=16)
        outs = [r.step(cache, h[:, :5], position_ids=pos(0, 5), attention_mask=am(5))]
        for t in range(5, 9):
            outs.append(
                r.step(cache, h[:, t : t + 1], position_ids=pos(t, t + 1), attention_mask=am(t + 1))
            )
        assert cache.length == 9
        torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=0, atol=ATOL)

        # Replay: a fresh session prefilled with the whole 8-token history, then one step.
        replay = r.new_cache(batch_size=3, max_length=9)
        first = r.step(replay, h[:, :8], position_ids=pos(0, 8), attention_mask=am(8))
        last = r.step(replay, h[:, 8:], position_ids=pos(8, 9), attention_mask=am(9))
        torch.testing.assert_close(torch.cat([first, last], dim=1), ref, rtol=0, atol=ATOL)
        with pytest.raises(RunnerError, match="max_length"):
            r.step(replay, h[:, :1])
        h = ref


@pytest.mark.parametrize("padded", [False, True])
def test_backward_matches_autograd(runners, parts, hf_model, padded: bool) -> None:
    """Chain rule across the spans (runner.backward) equals HF autograd end to end."""
    ids, mask, positions = _batch(seed=2)
    kw = {"attention_mask": mask, "position_ids": positions} if padded else {}
    weight = torch.randn(3, 9, 512, generator=torch.Generator().manual_seed(3))

    embeds = hf_model.get_input_embeddings()(ids).detach().requires_grad_(True)
    (hf_model(inputs_embeds=embeds, **kw).logits * weight).sum().backward()

    hs = [parts.embed_tokens(ids)]
    for r in runners:
        hs.append(r.forward(hs[-1], **kw))
    last = hs[-1].clone().requires_grad_(True)
    (parts.lm_head(parts.norm(last)) * weight).sum().backward()
    grad = last.grad
    before = [p.clone() for r in runners for b in r.blocks for p in b.parameters()]
    for r, h in zip(reversed(runners), reversed(hs[:-1]), strict=True):
        grad = r.backward(h, grad, **kw)
    torch.testing.assert_close(grad, embeds.grad, rtol=0, atol=ATOL)
    after = [p for r in runners for b in r.blocks for p in b.parameters()]
    assert all(torch.equal(a, b) and a.grad is None for a, b in zip(after, before, strict=True))


def test_rejects_bad_inputs(model_dir: ModelDir, runners) -> None:
    r = runners[0]
    h = torch.randn(2, 4, 64)
    bad_forward = [
        dict(hidden_states=torch.randn(4, 64)),
        dict(hidden_states=torch.randn(2, 4, 63)),
        dict(hidden_states=torch.randn(2, 0, 64)),
        dict(hidden_states=torch.ones(2, 4, 64, dtype=torch.long)),
        dict(hidden_states=h, attention_mask=torch.ones(2, 5, dtype=torch.long)),
        dict(hidden_states=h, attention_mask=torch.ones(2, 4)),
        dict(hidden_states=h, position_ids=torch.arange(3).unsqueeze(0)),
        dict(hidden_states=h, position_ids=-torch.ones(2, 4, dtype=torch.long)),
        dict(hidden_states=h, position_ids=torch.zeros(2, 4)),
    ]
    for kw in bad_forward:
        with pytest.raises(RunnerError):
            r.forward(**kw)
    with pytest.raises(RunnerError, match="grad_outputs"):
        r.backward(h, torch.randn(2, 3, 64))
    cache = r.new_cache(batch_size=2, max_length=4)
    with pytest.raises(RunnerError, match="batch size"):
        r.step(cache, torch.randn(1, 2, 64))
    with pytest.raises(RunnerError, match="attention_mask"):
        r.step(cache, h[:, :2], attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(RunnerError, match="max_length"):
        r.step(cache, torch.randn(2, 5, 64))
    assert cache.length == 0
    with pytest.raises(RunnerError, match="span"):
        runners[1].step(cache, h)
    with pytest.raises(RunnerError):
        r.new_cache(batch_size=0, max_length=4)
    for bad in [(0, 0), (3, 2), (0, 7), (-1, 2)]:
        with pytest.raises(RunnerError):
            BlockRunner(model_dir, *bad)
