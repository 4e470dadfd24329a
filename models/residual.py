"""The size of every term a span adds to the residual stream: the scale a proof needs.

A span's output is its input plus one update per sub-layer (attention, MLP) of each
block. Honest rounding error is bounded relative to the sizes of the terms that were
summed, not relative to the sum: when a client picks an input whose terms nearly cancel,
the output is tiny and any honest rounding is "large" relative to it. So a verifier
measures errors against S_t = max|input_t| + sum_j max|term_j,t| per token (peaks, not
RMS: honest bfloat16 error concentrates in the few massive-activation channels, and an
element's rounding error is bounded by the sizes of the values summed into it), which no
choice of input can make small while the arithmetic stays honest.

For gradients the same holds with the incoming gradient and each branch's contribution
to the gradient of the residual stream (the gradient through each pre-sub-layer norm).

Hooks are attached for one call and removed; architectures without the Llama-style
``self_attn`` / ``mlp`` / ``input_layernorm`` / ``post_attention_layernorm`` sub-modules
get no scale (None), and verifiers then never call an answer proven on scale grounds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

FORWARD_TERMS = ("self_attn", "mlp")
BACKWARD_TERMS = ("input_layernorm", "post_attention_layernorm")


def token_peak(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim, in float32: [..., hidden] -> [...]."""
    return x.detach().to(torch.float32).abs().amax(-1)


def has_terms(blocks: Sequence[nn.Module]) -> bool:
    names = FORWARD_TERMS + BACKWARD_TERMS
    return all(all(hasattr(b, n) for n in names) for b in blocks)


class ScaleRecorder:
    """Sums the peaks of the residual terms of the blocks it hooks, per token."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None

    def add(self, term: torch.Tensor) -> None:
        peak = token_peak(term)
        self.total = peak if self.total is None else self.total + peak

    def forward_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        self.add(output[0] if isinstance(output, tuple) else output)

    def backward_hook(self, module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        if grad_input and grad_input[0] is not None:
            self.add(grad_input[0])


@contextmanager
def recording(blocks: Sequence[nn.Module], backward: bool) -> Iterator[ScaleRecorder | None]:
    """Hook the residual terms of `blocks` for one call; None if the architecture has no
    recognisable sub-layers."""
    if not has_terms(blocks):
        yield None
        return
    recorder = ScaleRecorder()
    handles = []
    try:
        for block in blocks:
            for name in BACKWARD_TERMS if backward else FORWARD_TERMS:
                module = getattr(block, name)
                if backward:
                    handles.append(module.register_full_backward_hook(recorder.backward_hook))
                else:
                    handles.append(module.register_forward_hook(recorder.forward_hook))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
