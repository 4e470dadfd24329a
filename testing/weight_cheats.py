"""Honest variants and cheats for bench/calibrate.py: weight quantisers, swapped blocks,
output tampering. Testing/bench only: nothing here is reachable from `node start`."""

from __future__ import annotations

import copy

import torch
from torch import nn

from trustswarm.models.runner import BlockRunner


@torch.no_grad()
def quantise_int4(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Symmetric 4-bit (levels -8..7) with one absmax scale per group of `group` inputs.
    (The asymmetric Q4_1 grid of the bundled GGUF would return its own weights unchanged.)"""
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"input size {in_f} is not a multiple of {group}")
    g = w.float().reshape(out_f, in_f // group, group)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7.0
    return ((g / scale).round().clamp(-8, 7) * scale).reshape(out_f, in_f).to(w.dtype)


@torch.no_grad()
def quantise_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one absmax scale per output channel (row)."""
    scale = w.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
    return ((w.float() / scale).round().clamp(-127, 127) * scale).to(w.dtype)


def _with_blocks(runner: BlockRunner, blocks: list[nn.Module]) -> BlockRunner:
    """A shallow copy of `runner` computing with `blocks` (same span, masks, rotary)."""
    other = copy.copy(runner)
    other.blocks = blocks
    return other


def quantised_runner(runner: BlockRunner, quantise) -> BlockRunner:
    """A copy of `runner` whose every Linear weight went through `quantise`."""
    blocks = copy.deepcopy(runner.blocks)
    with torch.no_grad():
        for block in blocks:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(quantise(m.weight))
    return _with_blocks(runner, blocks)


def other_block_index(i: int, num_blocks: int) -> int:
    """The block whose weights stand in for block i: the next one, or the previous at the end."""
    return i + 1 if i + 1 < num_blocks else i - 1


def swapped_runner(runner: BlockRunner, i: int) -> BlockRunner:
    """A copy of `runner` where block i computes with another block's weights."""
    blocks = list(runner.blocks)
    j = other_block_index(i, runner.model_dir.num_blocks)
    (blocks[i - runner.start],) = runner.model_dir.load_blocks(j, j + 1, dtype=runner.dtype)
    return _with_blocks(runner, blocks)


def noise_tensor(
    x: torch.Tensor, frac: float, gen: torch.Generator, real: torch.Tensor
) -> torch.Tensor:
    """Gaussian noise with std `frac` x the RMS of each sequence's tensor (its real tokens:
    `real` is [B, T, 1], False on padding)."""
    sq = (x.float().pow(2) * real).sum(dim=(-2, -1), keepdim=True)
    rms = (sq / (real.sum(dim=(-2, -1), keepdim=True) * x.shape[-1])).sqrt()
    return x + frac * rms * torch.randn(x.shape, generator=gen)


def noise_token(x: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise with std `frac` x the RMS of each token (the hardest noise to see)."""
    rms = x.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
    return x + frac * rms * torch.randn(x.shape, generator=gen)
