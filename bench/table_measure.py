"""The two measurements of the performance table, identical for every setup.

* inference steps/s: greedy generation after a prefix of `prefix` tokens; only the decode
  steps are timed (token i to token i+1 as the generate loop emits them), so the prefill
  does not count. One step = embedding + every block + norm + LM head for one token.
* forward tokens/s: one forward pass of a [batch, seq] batch of token ids (whole model,
  logits included), batch * seq / seconds.

Local HF, offloading and the swarm all go through these functions (the swarm's
`generate` and forward follow Hugging Face's signatures).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


class TokenClock:
    """A generate streamer that notes when each new token appears."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 1:  # HF first puts the prompt ([1, L]); new tokens are [batch]
            self.times.append(time.monotonic())  # CLOCK_MONOTONIC: same in every process

    def end(self) -> None:
        pass


def token_ids(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def inference_steps_per_s(
    model,
    prefix: int,
    steps: int,
    windows: int,
    vocab: int,
    seed: int = 0,
    spans: list[tuple[float, float, int]] | None = None,
) -> list[float]:
    """Decode steps per second after a `prefix`-token prompt, prefill not timed: one
    generate of windows * steps + 1 tokens, cut into `windows` consecutive windows of
    `steps` steps (so the prefill is paid once, not once per repeat). `spans` receives
    each window's (start, end, steps) in time.monotonic() seconds."""
    ids = token_ids(1, prefix, vocab, seed)
    clock = TokenClock()
    total = windows * steps + 1
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=total,
            do_sample=False,
            eos_token_id=[],  # never stop early
            streamer=clock,
        )
    made = out.shape[1] - prefix
    if made != total or len(clock.times) != total:
        raise RuntimeError(f"generate made {made} tokens ({len(clock.times)} timed), not {total}")
    t = clock.times
    bounds = [(t[w * steps], t[(w + 1) * steps]) for w in range(windows)]
    if spans is not None:
        spans += [(a, b, steps) for a, b in bounds]
    return [steps / (b - a) for a, b in bounds]


def forward_tokens_per_s(
    model,
    batch: int,
    seq: int,
    vocab: int,
    seed: int = 0,
    spans: list[tuple[float, float, int]] | None = None,
) -> float:
    ids = token_ids(batch, seq, vocab, seed)
    with torch.inference_mode():
        began = time.monotonic()
        logits = model(input_ids=ids).logits
        ended = time.monotonic()
    seconds = ended - began
    if spans is not None:
        spans.append((began, ended, batch * seq))
    if tuple(logits.shape[:2]) != (batch, seq):
        raise RuntimeError(f"forward returned logits of shape {tuple(logits.shape)}")
    return batch * seq / seconds


COLUMNS = ("inf_short", "inf_long", "fwd_small", "fwd_big")


@dataclass(frozen=True)
class Workload:
    """What every row measures: two prefixes, two batch sizes, `repeats` of each."""

    short_prefix: int = 32
    long_prefix: int = 256
    steps: int = 8  # decode steps per timed window
    seq: int = 16  # tokens per sequence in the forward measurement
    small_batch: int = 1
    big_batch: int = 16
    repeats: int = 3

    def title(self, column: str) -> str:
        return {
            "inf_short": f"inference steps/s, {self.short_prefix}-token prefix",
            "inf_long": f"inference steps/s, {self.long_prefix}-token prefix",
            "fwd_small": f"forward tokens/s, batch {self.small_batch}×{self.seq}",
            "fwd_big": f"forward tokens/s, batch {self.big_batch}×{self.seq}",
        }[column]

    def measure(
        self,
        model,
        column: str,
        vocab: int,
        seed: int,
        steps: int = 0,
        spans: list[tuple[float, float, int]] | None = None,
    ) -> list[float]:
        """`repeats` values of one column (steps: decode steps per window, 0 = default);
        `spans` receives each repeat's (start, end, units) in time.monotonic() seconds."""
        steps = steps or self.steps
        if column in ("inf_short", "inf_long"):
            prefix = self.short_prefix if column == "inf_short" else self.long_prefix
            return inference_steps_per_s(model, prefix, steps, self.repeats, vocab, seed, spans)
        if column in ("fwd_small", "fwd_big"):
            batch = self.small_batch if column == "fwd_small" else self.big_batch
            return [
                forward_tokens_per_s(model, batch, self.seq, vocab, seed + r, spans)
                for r in range(self.repeats)
            ]
        raise ValueError(f"unknown column {column!r}")


# -- the two local baselines -------------------------------------------------------------


def load_local(model_dir: Path):
    """Plain HF LlamaForCausalLM with exactly the model directory's weights."""
    from generation import load_local_model

    return load_local_model(model_dir)


def make_offloading(model, model_dir: Path) -> list:
    """Turn a local HF model into an "offloading" one: before each block runs, its weights
    are read from its safetensors file and copied into the block (as offloading streams
    weights to the device for every step). Returns the hook handles (`.remove()` undoes)."""
    from safetensors.torch import load_file

    from trustswarm.models.store import ModelDir

    directory = ModelDir.open(model_dir)
    handles = []
    for i, layer in enumerate(model.model.layers):
        path = directory.path / directory.manifest.block_files[i]

        def reload(module, _args, path=path) -> None:
            module.load_state_dict(load_file(path), strict=True)

        handles.append(layer.register_forward_pre_hook(reload))
    return handles
