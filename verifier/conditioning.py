"""How ill-conditioned natural inputs of a span get: the floor of a verifier's error scale.

A client chooses the inputs it sends, so it can choose one where the span's output
nearly cancels (x + sum of the blocks' updates ~ 0). There honest rounding, which is
proportional to the sizes of what was summed, is huge relative to the output, and a
plain relative comparison would "prove" fraud against an honest server. So a verifier
measures every error against at least S_t / kappa (models/residual.py: S_t is the peak of
the input plus the peak of every residual term), where kappa is the largest ratio
S_t / RMS(output_t) seen on natural inputs of the same span: the verifier's own
challenges (real prompts through the reference blocks). For natural tokens the floor
changes nothing (their ratio is at most kappa); for any other input it bounds the honest
error by what the worst natural token already shows. Computed once per (kind, span)
and cached.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from trustswarm.models.runner import BlockRunner

from .challenges import Challenge, ChallengeFactory

SAMPLES = 12  # natural prompts per (kind, span)


def _ratio(out: torch.Tensor, scale: torch.Tensor | None) -> float:
    if scale is None:
        return math.inf
    rms = out.detach().float().pow(2).mean(-1).sqrt()
    return float((scale / rms.clamp_min(torch.finfo(torch.float32).tiny)).max())


class NaturalConditioning:
    """kappa(kind, start, end): the largest S_t / RMS(out_t) over natural inputs."""

    def __init__(self, factory: ChallengeFactory, samples: int = SAMPLES) -> None:
        self.factory = factory
        self.runner: BlockRunner = factory.runner
        self.samples = samples
        self._cache: dict[tuple[str, int, int], float] = {}

    def __call__(self, kind: str, start: int, end: int) -> float:
        key = (kind, start, end)
        if key not in self._cache:
            measure = self._backward if kind == "grad" else self._forward
            make: Callable[[int, int], Challenge] = (
                self.factory.make_backward if kind == "grad" else self.factory.make
            )
            self._cache[key] = max(measure(make(start, end)) for _ in range(self.samples))
        return self._cache[key]

    def _forward(self, challenge: Challenge) -> float:
        step = challenge.steps[0]
        out, scale = self.runner.forward_with_scale(
            step.hidden, step.positions, step.mask, challenge.start, challenge.end
        )
        return _ratio(out, scale)

    def _backward(self, challenge: Challenge) -> float:
        step = challenge.steps[0]
        out, scale = self.runner.backward_with_scale(
            step.hidden,
            challenge.grad_outputs,
            step.positions,
            step.mask,
            challenge.start,
            challenge.end,
        )
        return _ratio(out, scale)
