"""Next-token comparator: do two answers lead to the same next-token distribution?

The hidden-state comparator (comparator.py) bounds how far an answer may be from the
reference, but an adversary moves the next-token position along the one direction that
matters (the gradient of a target token's logit), so an error honest arithmetic makes in
a random direction is enough to pick the next token when the reference's top two tokens
are close. Where the logits can be computed (a span ending at the last block, with the
client's own LM head; a verifier, which holds every block), this bounds the effect on
the next token directly, for every protected position:

* **flip**: the two answers' greedy next tokens may differ only at a near-tie: each
  side's margin of its own top token over the other's top token is at most ``flip_gap``
  logits (honest bfloat16 moves that margin by <= 0.12 logits on SmolLM2; calibrated in
  bench/results/calibration_trust.md).
* **spread**: over the candidate tokens (the ``top_k`` of either side), the logit
  differences ``a_i - b_i`` span at most ``logit_spread`` (a common shift changes no
  probability); so no candidate's probability moves by more than a factor
  ``exp(logit_spread)`` relative to another's.

Symmetric; float32; never raises for bad tensors (a rejection with a reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .comparator import Verdict


@dataclass(frozen=True)
class NextTokenTolerance:
    flip_gap: float  # logits: the greedy token may change only at a near-tie this close
    logit_spread: float  # logits: max - min of (a_i - b_i) over the candidate tokens
    top_k: int = 20

    def __post_init__(self) -> None:
        if not (self.flip_gap >= 0 and self.logit_spread > 0 and self.top_k >= 1):
            raise ValueError("flip_gap must be >= 0, logit_spread > 0, top_k >= 1")

    def loosest(self, other: NextTokenTolerance) -> NextTokenTolerance:
        return NextTokenTolerance(
            max(self.flip_gap, other.flip_gap),
            max(self.logit_spread, other.logit_spread),
            max(self.top_k, other.top_k),
        )


# Calibrated on SmolLM2-135M (bench/results/calibration_trust.md, bench/results/
# adversary_steering.md): honest bfloat16 vs float32 changed the greedy token in ~4 % of
# prompts with margins up to 0.12 logits, and moved candidate logits apart by up to 0.25
# on prefills. Decode steps through a bfloat16 KV cache move them further: up to 0.44
# (spans 15:30 and 20:30, 864 greedy steps of 18 chat prompts; 4 above the earlier 0.4,
# which failed honest float32 + bfloat16 votes), so the spread bound is 0.6 (1.36x).
# Votes (replica vs replica, either may be honest bfloat16 on any hardware):
NEXT_TOKEN_TOLERANCES: dict[str, NextTokenTolerance] = {
    "float32": NextTokenTolerance(flip_gap=0.01, logit_spread=0.02),
    "bfloat16": NextTokenTolerance(flip_gap=0.15, logit_spread=0.6),
    "float16": NextTokenTolerance(flip_gap=0.15, logit_spread=0.6),
}
# A verifier compares an answer with its float32 reference AND with its own recomputation
# in the answer's dtype, and accepts either: an honest server reproduces the latter (same
# arithmetic), so the float32 comparison can hold the greedy token to a near-tie of 0.05
# logits, the bound a steering server has to live within (flips at gaps < 0.05 happen to
# honest bfloat16 too).
REFERENCE_TOLERANCES: dict[str, NextTokenTolerance] = {
    "float32": NextTokenTolerance(flip_gap=0.01, logit_spread=0.02),
    "bfloat16": NextTokenTolerance(flip_gap=0.05, logit_spread=0.6),
    "float16": NextTokenTolerance(flip_gap=0.05, logit_spread=0.6),
}
SAME_DTYPE_TOLERANCE = NextTokenTolerance(flip_gap=0.02, logit_spread=0.1)


def next_token_tolerance(*dtypes: str) -> NextTokenTolerance:
    """The loosest tolerance of the given wire dtypes (float64 compares like float32)."""
    names = ["float32" if d == "float64" else d for d in dtypes] or ["float32"]
    unknown = [n for n in names if n not in NEXT_TOKEN_TOLERANCES]
    if unknown:
        raise ValueError(f"no next-token tolerance for dtype {unknown[0]}")
    tol = NEXT_TOKEN_TOLERANCES[names[0]]
    for name in names[1:]:
        tol = tol.loosest(NEXT_TOKEN_TOLERANCES[name])
    return tol


def _reject(reason: str) -> Verdict:
    return Verdict(False, reason, float("nan"), float("nan"))


def compare_next_token(
    a_logits: torch.Tensor, b_logits: torch.Tensor, tolerance: NextTokenTolerance
) -> Verdict:
    """Compare [positions, vocab] logits row by row. The verdict's worst_token_error is
    the largest spread seen, max_abs_error the largest flip margin (0 without flips)."""
    if not isinstance(a_logits, torch.Tensor) or not isinstance(b_logits, torch.Tensor):
        return _reject("logits are not tensors")
    if a_logits.shape != b_logits.shape or a_logits.ndim != 2 or a_logits.shape[1] < 2:
        return _reject(f"logit shapes {tuple(a_logits.shape)} and {tuple(b_logits.shape)}")
    a, b = a_logits.detach().float(), b_logits.detach().float()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return _reject("logits hold NaN/Inf")
    k = min(tolerance.top_k, a.shape[1])
    worst_spread, worst_flip = 0.0, 0.0
    for p in range(a.shape[0]):
        top_a, top_b = int(a[p].argmax()), int(b[p].argmax())
        if top_a != top_b:
            margin = max(float(a[p, top_a] - a[p, top_b]), float(b[p, top_b] - b[p, top_a]))
            worst_flip = max(worst_flip, margin)
            if not margin <= tolerance.flip_gap:
                return Verdict(
                    False,
                    f"position {p}: next token {top_a} vs {top_b}, margin {margin:.3g} logits"
                    f" > {tolerance.flip_gap:.3g} (not a near-tie)",
                    worst_spread,
                    margin,
                )
        candidates = torch.cat([a[p].topk(k).indices, b[p].topk(k).indices]).unique()
        delta = a[p, candidates] - b[p, candidates]
        spread = float(delta.max() - delta.min())
        worst_spread = max(worst_spread, spread)
        if not spread <= tolerance.logit_spread:
            return Verdict(
                False,
                f"position {p}: candidate logits moved apart by {spread:.3g}"
                f" > {tolerance.logit_spread:.3g}",
                spread,
                worst_flip,
            )
    return Verdict(True, "", worst_spread if not math.isnan(worst_spread) else 0.0, worst_flip)
