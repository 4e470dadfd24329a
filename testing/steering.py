"""Testing only: steering, a server that picks the next token within the comparator.

A server that answers in bfloat16 is allowed bfloat16-sized errors. `steer_last_token`
spends that allowance on purpose: it moves only the last token's row of the answer
(the one the next token is read from) by projected gradient steps that raise a target
token's logit over the current top one, and keeps only candidates the caller's `accept`
passes (the comparator against the honest reference, with the tolerance of the dtype
the attacker announced, plus anything else: a verifier's judgement, a vote).

Each step tries two moves from the current accepted point, each cut back by bisection
to the last accepted point on its segment:

* a normalised gradient step (step length adapted to what was accepted);
* a Frank-Wolfe vertex built from the `Tolerance`: the `outlier_channels` channels of
  largest gradient set to just under `max_abs_ratio` x the token RMS (they are left out
  of the bulk error), the other channels along the gradient with the bulk budget of
  the token cap (an answer's one last token may use the outlier-token error).

The server side (`SteeringServer`, a real BlockServer) is in testing/steering_server.py.
Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trustswarm.models.runner import BlockRunner, InferenceCache
from trustswarm.models.store import ClientParts
from trustswarm.protocol.comparator import FORWARD_TOLERANCES, Tolerance, compare
from trustswarm.protocol.errors import TrustswarmError

Downstream = Callable[[torch.Tensor], torch.Tensor]
Accept = Callable[[torch.Tensor], bool]
SAFETY = 0.98  # the vertex stays this fraction inside each bound
BISECTIONS = 12


class SteeringError(TrustswarmError):
    """A steering attack asked for something it cannot do (bad shapes, tokens)."""


@dataclass(frozen=True)
class SteeringResult:
    output: torch.Tensor  # the steered answer, in the announced dtype
    target: int
    reached: bool  # the target is the argmax of downstream(output)
    accepted: bool  # accept(output)
    margin: float  # target logit minus the best other logit, at the end
    initial_margin: float
    steps: int

    @property
    def success(self) -> bool:
        return self.reached and self.accepted


class _SpanFn(torch.autograd.Function):
    """A span of blocks as a differentiable function, through the runner's public
    forward and backward (both exact; the backward recomputes the forward)."""

    @staticmethod
    def forward(ctx, h, runner, positions, mask, start, end):  # noqa: ANN001, ANN205
        ctx.save_for_backward(h)
        ctx.args = (runner, positions, mask, start, end)
        # clone(): outside inference mode, a normal tensor autograd may use.
        return runner.forward(h.detach(), positions, mask, start, end).float().clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (h,) = ctx.saved_tensors
        runner, positions, mask, start, end = ctx.args
        g = runner.backward(h.detach(), grad.contiguous(), positions, mask, start, end)
        return g.float().clone(), None, None, None, None, None


class ModelDownstream:
    """h ([1, T, H], a span's output) -> logits [V] at the last position: blocks
    start:end of `after` (None: the span ends at the last block), then norm and head.

    Differentiable in h when h requires grad (the whole sequence through the runner's
    forward and backward). Otherwise only the last row is run, against a KV cache of
    the other rows kept while they stay the same: steering changes only the last row,
    so each trial costs one token instead of T."""

    def __init__(
        self,
        parts: ClientParts,
        after: BlockRunner | None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> None:
        self.parts, self.after = parts, after
        self.positions, self.mask = positions, mask
        self.start, self.end = start, end
        self._prefix: torch.Tensor | None = None
        self._cache: InferenceCache | None = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        if self.after is None:
            pass
        elif torch.is_grad_enabled() and x.requires_grad:
            span = (self.positions, self.mask, self.start, self.end)
            x = _SpanFn.apply(x, self.after, *span)
        else:
            x = self._last_row(x)
        with torch.inference_mode(not (torch.is_grad_enabled() and x.requires_grad)):
            return self.parts.lm_head(self.parts.norm(x[:, -1:])).float().reshape(-1)

    def _last_row(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[1]
        positions = self.positions
        if positions is None:
            positions = torch.arange(tokens, dtype=torch.long)[None]
        mask = self.mask if self.mask is not None else torch.ones(1, tokens, dtype=torch.long)
        prefix = x[:, :-1]
        if self._prefix is None or not torch.equal(self._prefix, prefix):
            self._cache = self.after.new_cache(1, tokens, self.start, self.end)
            if tokens > 1:
                self.after.step(self._cache, prefix, positions[:, :-1], mask[:, :-1])
            self._prefix = prefix.clone()
        out = self.after.step(self._cache, x[:, -1:], positions[:, -1:], mask)
        # Forget the row just run: the next trial replaces it.
        self._cache.kv.crop(-1)
        self._cache.length -= 1
        return out.float()


def model_downstream(
    parts: ClientParts,
    after: BlockRunner | None,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    start: int | None = None,
    end: int | None = None,
) -> ModelDownstream:
    """The rest of the model after a span, as `steer_last_token` needs it."""
    return ModelDownstream(parts, after, positions, mask, start, end)


def runner_up(logits: torch.Tensor) -> int:
    """The second most likely token."""
    return int(logits.reshape(-1).topk(2).indices[1])


def announced_tolerance(dtype: torch.dtype) -> Tolerance:
    """The forward tolerance of the dtype a server announced."""
    name = str(dtype).removeprefix("torch.")
    if name not in FORWARD_TOLERANCES:
        raise SteeringError(f"no forward tolerance for {name}")
    return FORWARD_TOLERANCES[name]


def comparator_accept(
    references: Sequence[torch.Tensor],
    tolerance: Tolerance | None = None,
    extra: Accept | None = None,
) -> Accept:
    """Accept a candidate that `compare` accepts against every reference (with
    `tolerance`, default the comparator's own choice) and that `extra` accepts."""

    def accept(candidate: torch.Tensor) -> bool:
        for reference in references:
            if not compare(candidate, reference, kind="hidden", tolerance=tolerance).agree:
                return False
        return extra is None or bool(extra(candidate))

    return accept


def _margin(logits: torch.Tensor, target: int) -> torch.Tensor:
    others = logits.clone()
    others[target] = -math.inf
    return logits[target] - others.max()


def _budgets(tolerance: Tolerance) -> tuple[float, float, float]:
    """(bulk relative error, max-abs guard, massive ratio) the last token may use. A
    comparator with protected tokens holds the next-token position to the bulk error and
    its own guard; one with a massive ratio leaves out only channels that large (0: any)."""
    guard = getattr(tolerance, "protected_guard", None)
    if guard is None:
        return tolerance.token_cap, tolerance.max_abs_ratio, 0.0
    return tolerance.token_rel_error, guard, getattr(tolerance, "massive_ratio", 0.0)


def outlier_channels(
    gradient: torch.Tensor, row: torch.Tensor, tolerance: Tolerance
) -> torch.Tensor:
    """The channels the comparator may leave out that matter most to the gradient."""
    k = min(tolerance.outlier_channels, row.numel() - 1)
    _, _, massive = _budgets(tolerance)
    rms = float(row.pow(2).mean().sqrt())
    score = gradient.abs().masked_fill(row.abs() < 1.05 * massive * rms, -1.0)
    k = min(k, int((score >= 0).sum()))
    return score.topk(k).indices if k > 0 else torch.empty(0, dtype=torch.long)


def vertex(
    gradient: torch.Tensor,
    row: torch.Tensor,
    tolerance: Tolerance,
    channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The delta of largest gradient . delta that the tolerance allows on one row
    (measured against `row`): `channels` (default `outlier_channels`) moved to the guard
    while staying massive, the rest along the gradient with the bulk budget."""
    bulk_error, guard, massive = _budgets(tolerance)
    h = row.numel()
    rms = float(row.pow(2).mean().sqrt())
    peak = SAFETY * guard * rms
    top = outlier_channels(gradient, row, tolerance) if channels is None else channels
    delta = torch.zeros_like(row)
    if top.numel():
        sign = gradient[top].sign()
        # Toward zero, a channel may shrink only down to the massive threshold.
        room = (row[top].abs() - 1.05 * massive * rms).clamp_min(0.0)
        shrinking = sign != row[top].sign()
        delta[top] = sign * torch.where(
            shrinking, room.clamp_max(peak), torch.full_like(room, peak)
        )
    rest = gradient.clone()
    rest[top] = 0.0
    norm = float(rest.norm())
    if norm > 0:
        budget = SAFETY * bulk_error * rms * math.sqrt(h - top.numel())
        bulk = (rest / norm * budget).clamp(-0.9 * peak, 0.9 * peak)
        delta += bulk * (rest != 0)
    return delta


@dataclass
class _Steerer:
    base: torch.Tensor  # float32 [1, T, H]
    dtype: torch.dtype
    target: int
    downstream: Downstream
    accept: Accept

    def candidate(self, delta: torch.Tensor) -> torch.Tensor:
        h = self.base.clone()
        h[0, -1] += delta
        return h.to(self.dtype)

    def margin(self, delta: torch.Tensor) -> float:
        with torch.no_grad():
            return float(_margin(self.downstream(self.candidate(delta).float()), self.target))

    def gradient(self, delta: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            d = delta.clone().requires_grad_(True)
            last = (self.base[0, -1] + d)[None, None]
            h = torch.cat([self.base[:, :-1], last], dim=1)
            (grad,) = torch.autograd.grad(_margin(self.downstream(h), self.target), d)
        return grad

    def best(
        self, delta: torch.Tensor, margin: float, trials: list[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        """The best accepted point toward any of the trials (or delta itself)."""
        best, best_margin = delta, margin
        for trial in trials:
            point = self.bisect(delta, trial)
            value = self.margin(point)
            if value > best_margin:
                best, best_margin = point, value
        return best, best_margin

    def bisect(self, good: torch.Tensor, trial: torch.Tensor) -> torch.Tensor:
        """The accepted point on the segment good -> trial farthest from `good`
        (`good` itself is accepted)."""
        if self.accept(self.candidate(trial)):
            return trial
        low, high = 0.0, 1.0
        for _ in range(BISECTIONS):
            mid = (low + high) / 2
            if self.accept(self.candidate(good + mid * (trial - good))):
                low = mid
            else:
                high = mid
        return good + low * (trial - good)


def _check(out_honest: torch.Tensor, target: int, dtype: torch.dtype) -> None:
    if out_honest.ndim != 3 or out_honest.shape[0] != 1 or out_honest.shape[1] < 1:
        raise SteeringError(f"out_honest must be [1, T, H], got {tuple(out_honest.shape)}")
    if not dtype.is_floating_point or target < 0:
        raise SteeringError("need a floating point dtype and a token id >= 0")


def steer_last_token(
    out_honest: torch.Tensor,
    target_token: int,
    downstream: Downstream,
    accept: Accept,
    steps: int = 20,
    *,
    tolerance: Tolerance | None = None,
    dtype: torch.dtype | None = None,
    min_margin: float = 0.0,
    patience: int = 4,
) -> SteeringResult:
    """Steer the next token (read from the last row of `out_honest`, [1, T, H]) toward
    `target_token`. `downstream(h)` gives the logits [V] at the last position (it must
    be differentiable in h); `accept(candidate)` is the test every returned answer
    passes; `tolerance` (the announced dtype's) enables the Frank-Wolfe vertex. Stops
    when the target leads by `min_margin`, after `steps`, or after `patience` steps
    without progress. The result is in `dtype` (default: out_honest's)."""
    dtype = dtype or out_honest.dtype
    _check(out_honest, target_token, dtype)
    base = out_honest.detach().float()
    st = _Steerer(base, dtype, target_token, downstream, accept)
    delta = torch.zeros_like(base[0, -1])
    margin = initial = st.margin(delta)
    if not accept(st.candidate(delta)):
        return SteeringResult(
            st.candidate(delta), target_token, margin > 0, False, margin, margin, 0
        )
    row = base[0, -1]
    radius = (tolerance.token_cap if tolerance else 0.05) * float(row.norm())
    done = stale = 0
    channels: torch.Tensor | None = None
    while done < steps and margin <= min_margin and stale < patience:
        done += 1
        gradient = st.gradient(delta)
        norm = float(gradient.norm())
        if not math.isfinite(norm) or norm == 0:
            break
        trials = [delta + gradient / norm * radius]
        if tolerance is not None:
            # The channels stay those of the first step: the set the comparator allows is
            # not convex across different choices of left-out channels.
            if channels is None:
                channels = outlier_channels(gradient, row, tolerance)
            trials.append(vertex(gradient, row, tolerance, channels))
        best, best_margin = st.best(delta, margin, trials)
        moved = float((best - delta).norm())
        radius = max(2 * moved, radius / 4) if moved > 0 else radius / 4
        stale = stale + 1 if best_margin <= margin + 1e-6 else 0
        delta, margin = best, best_margin
    final = st.candidate(delta)
    return SteeringResult(
        final, target_token, margin > 0, bool(accept(final)), margin, initial, done
    )
