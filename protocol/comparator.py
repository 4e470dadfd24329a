"""Tolerance comparator: do two servers' outputs for the same request agree?

Honest servers differ in the low bits (float32 vs bfloat16 compute, kernels, batch
composition). The comparator must accept that and reject tampering. It works per token (the
last dimension is the hidden / feature dimension, every leading index is one token), in
float32, with two tests:

* **bulk error** of a token: ``||a_t - b_t|| / scale_t`` over the token's channels, leaving
  out the ``outlier_channels`` channels where the two differ most. ``scale_t`` is the
  quadratic mean of the two tokens' RMS over the same kept channels,
  ``sqrt((||a_t||^2 + ||b_t||^2) / (2 n))``: symmetric (bit for bit: every operation on
  ``a`` and ``b`` commutes) and per token, so the attention-sink token with its massive
  activations (RMS ~100x the other tokens) is measured against its own size and neither
  hides nor swamps the others. A ×(1+x) scaling of a token reads as ~x, noise at x of the
  token's RMS reads as ~x.
* **outlier tokens**: up to ``ceil(outlier_token_fraction x tokens)`` tokens (at least
  one) may exceed ``token_rel_error`` as long as they stay within ``outlier_token_error``.
  On real prompts honest bfloat16 has isolated tokens (a second sink token, a token where
  a large activation is cancelled) at 5-8 % forward and far more in gradients, while every
  other token agrees to ~2 %; a cheat that changes the whole answer by 5 % moves every
  token. The cost: a cheat confined to one token in 32 (or to a 1-token decode step)
  is only held to ``outlier_token_error``.
* **max-abs guard**: ``max_i |a_ti - b_ti| / rms_t`` (full-token quadratic-mean RMS), so
  the left-out channels are still bounded.

Why leave channels out: on SmolLM2 the massive activation channel of the sink token grows
to ~700 inside blocks 2-9 and is then cancelled to ~100 by block 9. In bfloat16 a value near
700 is only kept to ±2, so the honest bfloat16 output of that one channel is off by up to
~25 (≈ 4 token-RMS) while every other channel of the token agrees to ~1.5 %. A plain
per-token L2 error then reads 10-20 % on honest servers, far above a 5 % cheat. Leaving
out a handful of channels per token makes honest bfloat16 read ~2 % and keeps a uniform
5 % change at 5 % (the cost: up to ``outlier_channels`` channels per token may be changed
within the max-abs guard; see bench/results/calibration.md).

What an adversary who read this may use, and why it is bounded (issue 10):

* **Only massive channels are left out**: a channel of a token may be left out only when
  it is massive in both answers (``|a_i|`` and ``|b_i|`` at least ``massive_ratio`` times the
  token's RMS). Those are the model's few massive-activation channels, where bfloat16
  keeps only ~3 significant digits of a large value; a cheat cannot pick "any 4 channels".
* **Protected tokens** (by default the last token of every sequence: the one whose output
  becomes the next token) get no outlier-token slot and a tighter max-abs guard
  (``protected_max_abs_ratio``): they are held to the bulk tolerance.
* Steering inside the bulk tolerance is bounded separately, on the next-token logits
  (protocol/next_token.py), by the client where it has the LM head and by verifiers.

Thresholds per wire dtype come from bench/calibrate.py on the real SmolLM2 (forward
hidden states and backward input gradients); the results and the margin rule are in
bench/results/calibration.md. The comparator is vectorised (no Python loop over tokens):
it runs on every redundant step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FORWARD_TOLERANCES",
    "GRADIENT_TOLERANCES",
    "Tolerance",
    "TokenErrors",
    "Verdict",
    "compare",
    "next_token_positions",
    "token_errors",
    "tolerance_for",
]

# A token whose RMS is below this fraction of the tensor's mean token RMS is measured
# against that floor instead (its differences are negligible for the model; avoids 0/0).
SCALE_FLOOR = 1e-3
KINDS = ("hidden", "grad")


@dataclass(frozen=True)
class Tolerance:
    """Acceptance thresholds for one wire dtype and kind of tensor."""

    token_rel_error: float  # max per-token bulk relative L2 error (see module docstring)
    max_abs_ratio: float  # max |a - b| of any element, in units of its token's RMS
    outlier_channels: int = 4  # at most this many massive channels per token left out
    # A channel may be left out only if it is at least this many token RMS in both answers.
    massive_ratio: float = 5.0
    # Up to ceil(outlier_token_fraction x tokens) tokens (at least 1) may exceed
    # token_rel_error, if they stay within outlier_token_error (isolated honest outliers).
    outlier_token_fraction: float = 1 / 32
    outlier_token_error: float = 0.0  # 0: no outlier tokens (= token_rel_error)
    # A token's scale is at least this fraction of the tensor's mean token RMS.
    scale_floor: float = SCALE_FLOOR
    # Max-abs guard of protected tokens (0: the same as max_abs_ratio).
    protected_max_abs_ratio: float = 0.0
    # Bulk error bound of protected tokens (0: token_rel_error). They get no outlier
    # slot; this is their own bound, calibrated on honest decode steps.
    protected_rel_error: float = 0.0

    def __post_init__(self) -> None:
        if not (self.token_rel_error > 0 and self.max_abs_ratio > 0):
            raise ValueError("tolerances must be positive")
        if not 0 <= self.outlier_token_fraction < 1 or self.outlier_token_error < 0:
            raise ValueError("outlier_token_fraction must be in [0, 1), the error >= 0")
        if self.outlier_channels < 0:
            raise ValueError("outlier_channels must be >= 0")
        if not self.scale_floor > 0:
            raise ValueError("scale_floor must be positive")
        if not self.massive_ratio > 0 or not self.protected_max_abs_ratio >= 0:
            raise ValueError("massive_ratio must be positive, protected_max_abs_ratio >= 0")
        if not self.protected_rel_error >= 0:
            raise ValueError("protected_rel_error must be >= 0")

    def loosest(self, other: Tolerance) -> Tolerance:
        """A tolerance at least as loose as both (field by field)."""
        return Tolerance(
            token_rel_error=max(self.token_rel_error, other.token_rel_error),
            max_abs_ratio=max(self.max_abs_ratio, other.max_abs_ratio),
            outlier_channels=max(self.outlier_channels, other.outlier_channels),
            outlier_token_fraction=max(self.outlier_token_fraction, other.outlier_token_fraction),
            outlier_token_error=max(self.outlier_token_error, other.outlier_token_error),
            scale_floor=max(self.scale_floor, other.scale_floor),
            massive_ratio=min(self.massive_ratio, other.massive_ratio),
            # 0 means "the max_abs_ratio": the looser of the two when either is unset.
            protected_max_abs_ratio=0.0
            if 0.0 in (self.protected_max_abs_ratio, other.protected_max_abs_ratio)
            else max(self.protected_max_abs_ratio, other.protected_max_abs_ratio),
            protected_rel_error=0.0
            if self.protected_rel_error == other.protected_rel_error == 0.0
            else max(self.protected_cap, other.protected_cap),
        )

    @property
    def protected_guard(self) -> float:
        """The max-abs guard of protected tokens."""
        return self.protected_max_abs_ratio or self.max_abs_ratio

    @property
    def protected_cap(self) -> float:
        """The bulk error bound of protected tokens."""
        return self.protected_rel_error or self.token_rel_error

    @property
    def token_cap(self) -> float:
        """The bound no token may exceed."""
        return max(self.token_rel_error, self.outlier_token_error)

    def outlier_tokens(self, n_tokens: int) -> int:
        """How many of n_tokens may exceed token_rel_error (up to token_cap)."""
        if self.outlier_token_error <= self.token_rel_error:
            return 0
        return max(1, math.ceil(self.outlier_token_fraction * n_tokens))


@dataclass(frozen=True)
class Verdict:
    agree: bool
    reason: str  # "" when agree; a human reason otherwise
    worst_token_error: float  # largest per-token bulk relative error (nan if not computed)
    max_abs_error: float  # largest |a - b| of any element, in float32 units (nan if not computed)
    worst_abs_ratio: float = float("nan")  # largest |a - b| / token RMS (the guarded value)

    def __bool__(self) -> bool:
        return self.agree


# Calibrated by bench/calibrate.py on SmolLM2-135M (232 prompts forward, 21 backward; the
# rule and margins are in bench/results/calibration.md). float16 was measured forward only
# (<= 0.5 %) and takes the bfloat16 values.
# The next-token position (no outlier slot) has its own bound: honest bfloat16 decode
# steps through a bfloat16 KV cache reached 0.070 (span 0:15; 2,160 steps of 18 chat
# prompts over 5 spans, DESIGN-NOTES), far above the prefill bulk of 0.029.
_FWD_BF16 = Tolerance(
    token_rel_error=0.029, max_abs_ratio=9.2, outlier_token_error=0.16, protected_rel_error=0.1
)
_GRAD_BF16 = Tolerance(token_rel_error=0.18, max_abs_ratio=4.8, outlier_token_error=0.44)
FORWARD_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(token_rel_error=1e-4, max_abs_ratio=2e-3),
    "bfloat16": _FWD_BF16,
    "float16": _FWD_BF16,
}
GRADIENT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(token_rel_error=1e-4, max_abs_ratio=2e-3),
    "bfloat16": _GRAD_BF16,
    "float16": _GRAD_BF16,
}
_TABLES = {"hidden": FORWARD_TOLERANCES, "grad": GRADIENT_TOLERANCES}
# Wire dtypes outside the table compare like the nearest one (float64 is at least as exact).
_ALIASES = {torch.float64: "float32"}


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype in _ALIASES:
        return _ALIASES[dtype]
    return str(dtype).removeprefix("torch.")


def tolerance_for(a: torch.Tensor, b: torch.Tensor, kind: str = "hidden") -> Tolerance:
    """The tolerance for comparing a and b: the looser of their two wire dtypes' tolerances
    (honest servers answer in their compute dtype, so a bfloat16 server sends bfloat16)."""
    if kind not in _TABLES:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    table = _TABLES[kind]
    tols = []
    for t in (a, b):
        name = _dtype_name(t.dtype)
        if name not in table:
            raise ValueError(f"no {kind} tolerance for dtype {name} (have {sorted(table)})")
        tols.append(table[name])
    return tols[0].loosest(tols[1])


@dataclass(frozen=True)
class TokenErrors:
    """Per-token measures of two same-shape float tensors, flattened to [tokens]."""

    rel_error: torch.Tensor  # bulk relative L2 error per token
    abs_ratio: torch.Tensor  # max |a - b| per token / token RMS
    max_abs: torch.Tensor  # max |a - b| per token


def _peak(x: torch.Tensor) -> float:
    """max |x| in one pass; NaN if x holds a NaN, inf if it holds an inf."""
    return float(torch.linalg.vector_norm(x, float("inf"))) if x.numel() else 0.0


def token_errors(
    a: torch.Tensor,
    b: torch.Tensor,
    outlier_channels: int = 4,
    scale_floor: float = SCALE_FLOOR,
    massive_ratio: float = 5.0,
    token_floor: torch.Tensor | None = None,
) -> TokenErrors:
    """The comparator's per-token measures (no validation: finite float tensors, same shape,
    at least one element). Exposed for calibration. About a dozen passes over the data.
    `token_floor` (per token, in the tensors' units) raises each token's scale to at
    least that much: a verifier's floor from the sizes of what the span summed."""
    h = a.shape[-1] if a.ndim else 1
    a32 = a.detach().to(torch.float32).reshape(-1, h)
    b32 = b.detach().to(torch.float32).reshape(-1, h)
    # Far from 1, scale both by the same power of two (exact) so squares cannot overflow
    # or underflow.
    peak = max(_peak(a32), _peak(b32))
    unit = 1.0
    if peak > 0 and not 2.0**-30 < peak < 2.0**30:
        unit = 2.0 ** math.frexp(peak)[1]
        a32, b32 = a32 / unit, b32 / unit
    d2 = a32 - b32
    d2.mul_(d2)
    # Twice the mean square of the pair (the 2 cancels in every ratio). Not addcmul: a
    # fused multiply-add rounds a*a + b*b and b*b + a*a differently.
    e2 = a32 * a32
    e2.add_(b32 * b32)
    full_e2 = e2.sum(-1)
    max_d2 = d2.amax(-1)
    rms = (full_e2 / (2 * h)).sqrt()
    floor = max(float(rms.mean()) * scale_floor, torch.finfo(torch.float32).tiny)
    left_out = _massive_outliers(a32, b32, d2, rms, min(outlier_channels, h - 1), massive_ratio)
    if left_out is not None:
        d2.masked_fill_(left_out, 0.0)
        e2.masked_fill_(left_out, 0.0)
        kept_e2 = e2.sum(-1)
        n = h - left_out.sum(-1).to(torch.float32)
    else:
        kept_e2 = full_e2
        n = torch.full_like(full_e2, float(h))
    if token_floor is not None:
        # In the same power-of-two units as a32, b32 (NaN-safe: NaN floors count as 0).
        token_floor = torch.nan_to_num(token_floor.detach().float().reshape(-1) / unit, nan=0.0)
    scale = (kept_e2 / (2 * n)).sqrt().clamp_min(floor)
    if token_floor is not None:
        scale = torch.maximum(scale, token_floor)
        rms = torch.maximum(rms, token_floor)
    rel = (d2.sum(-1) / n).sqrt() / scale
    max_abs = max_d2.sqrt()
    ratio = max_abs / rms.clamp_min(floor)
    return TokenErrors(rel_error=rel, abs_ratio=ratio, max_abs=max_abs * unit)


def _massive_outliers(
    a32: torch.Tensor,
    b32: torch.Tensor,
    d2: torch.Tensor,
    rms: torch.Tensor,
    k: int,
    massive_ratio: float,
) -> torch.Tensor | None:
    """Per token, the (at most k) channels left out of the bulk error: the most different
    of the channels that are massive in both answers. None when there are none. Symmetric:
    every input is the same for (a, b) and (b, a)."""
    if k <= 0:
        return None
    massive = torch.minimum(a32.abs(), b32.abs()) >= massive_ratio * rms.unsqueeze(-1)
    if not bool(massive.any()):
        return None
    score = torch.where(massive, d2, torch.full_like(d2, -1.0))
    idx = score.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(massive).scatter_(-1, idx, massive.gather(-1, idx))


def _position(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The index of token `flat_index` in the leading dims of `shape`."""
    lead = shape[:-1] or (1,)
    pos = []
    for size in reversed(lead):
        pos.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(pos))


def _reject(reason: str) -> Verdict:
    return Verdict(False, reason, float("nan"), float("nan"))


def next_token_positions(shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The default protected tokens of a [..., tokens, hidden] tensor: the last token of
    every sequence (its output becomes the next token). Flattened like token_errors."""
    lead = tuple(shape[:-1]) or (1,)
    mask = torch.zeros(lead, dtype=torch.bool)
    mask[..., -1] = True
    return mask.reshape(-1)


def _invalid(a: object, b: object, kind: str) -> str:
    """Why a and b cannot be compared at all ("" when they can)."""
    if kind not in _TABLES:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return f"not tensors: {type(a).__name__} and {type(b).__name__}"
    if a.shape != b.shape:
        return f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}"
    for name, t in (("first", a), ("second", b)):
        if not t.dtype.is_floating_point:
            return f"{name} tensor is not floating point: {t.dtype}"
    for name, t in (("first", a), ("second", b)):
        if not math.isfinite(_peak(t)):  # one pass; count only when rejecting
            n = int((~torch.isfinite(t)).sum())
            return f"{name} tensor has {n} NaN/Inf value{'s' if n > 1 else ''}"
    return ""


def compare(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    kind: str = "hidden",
    tolerance: Tolerance | None = None,
    protected: torch.Tensor | None = None,
    token_floor: torch.Tensor | None = None,
) -> Verdict:
    """Whether a and b agree within `tolerance` (default: tolerance_for(a, b, kind)).
    Symmetric; computed in float32, per token over the last dim. `protected` is a bool
    mask over the tokens (a.shape[:-1], or flattened); by default, for hidden states, the
    last token of every sequence. `token_floor`: see token_errors (verifiers only).
    Never raises for bad tensors: shape mismatch, non-float
    dtype and NaN/Inf are rejections with a reason."""
    invalid = _invalid(a, b, kind)
    if invalid:
        return _reject(invalid)
    if tolerance is None:
        try:
            tolerance = tolerance_for(a, b, kind)
        except ValueError as e:
            return _reject(str(e))
    if a.numel() == 0:
        return Verdict(True, "", 0.0, 0.0, 0.0)
    err = token_errors(
        a,
        b,
        tolerance.outlier_channels,
        tolerance.scale_floor,
        tolerance.massive_ratio,
        token_floor,
    )
    n_tokens = err.rel_error.numel()
    if protected is None:
        protected = (
            next_token_positions(a.shape)
            if kind == "hidden"
            else torch.zeros(n_tokens, dtype=torch.bool)
        )
    protected = protected.reshape(-1).to(torch.bool)
    if protected.numel() != n_tokens:
        raise ValueError(f"protected mask has {protected.numel()} entries for {n_tokens} tokens")
    reason = _violation(err, tolerance, protected, tuple(a.shape))
    worst_rel = float(err.rel_error.max())
    worst_ratio = float(err.abs_ratio.max())
    return Verdict(not reason, reason, worst_rel, float(err.max_abs.max()), worst_ratio)


def _violation(
    err: TokenErrors, tolerance: Tolerance, protected: torch.Tensor, shape: tuple[int, ...]
) -> str:
    """The first rule the errors break, as a reason ("" when none). NaN-safe: a NaN error
    is never "within"."""
    rel, ratio = err.rel_error, err.abs_ratio
    n_tokens = rel.numel()

    def at(values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, tuple]:
        masked = values if mask is None else values.masked_fill(~mask, -1.0)
        worst, index = masked.max(0)
        return float(worst), _position(int(index), shape)

    worst, where = at(rel)
    cap = max(tolerance.token_cap, tolerance.protected_cap)
    if not worst <= cap:
        return f"token {where} relative error {worst:.3g} > {cap:.3g}"
    if bool((~(rel <= tolerance.protected_cap) & protected).any()):
        worst, where = at(rel, protected)
        return (
            f"next-token position {where} relative error {worst:.3g}"
            f" > {tolerance.protected_cap:.3g} (no outlier allowance there)"
        )
    # A protected token beyond the bulk bound (within its own) still takes a slot.
    over = ~(rel <= tolerance.token_rel_error)
    n_over = int(over.sum())
    allowed = tolerance.outlier_tokens(n_tokens)
    if n_over > allowed:
        return (
            f"{n_over} of {n_tokens} tokens have relative error > {tolerance.token_rel_error:.3g}"
            f" (allowed {allowed}); worst: token {where}, {worst:.3g}"
        )
    worst, where = at(ratio)
    if not worst <= tolerance.max_abs_ratio:
        return (
            f"token {where} max |a-b| is {worst:.3g}x the token RMS > {tolerance.max_abs_ratio:.3g}"
        )
    if bool(protected.any()):
        worst, where = at(ratio, protected)
        if not worst <= tolerance.protected_guard:
            return (
                f"next-token position {where} max |a-b| is {worst:.3g}x the token RMS"
                f" > {tolerance.protected_guard:.3g}"
            )
    return ""
