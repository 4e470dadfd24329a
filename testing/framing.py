"""Testing only: framing inputs, requests whose honest answer a verifier calls wrong.

A client picks the hidden states it sends, so it can pick them where honest compute
dtypes disagree most. Three searches, all on the reference weights the attacker holds:

* **cancel** (`find_framing_input`): Levenberg-Marquardt with float64 residuals for a
  one-token (or few-token) input x whose span output nearly cancels, minimising
  ||out(x)||^2 / ||x||^2 (the ratio keeps it off the trivial zero x = 0). Each block
  reads its input through RMSNorm, so its update is bounded and x + sum F_i(x) has a
  zero. There the float32 answer is float32 rounding and the bfloat16 answer is
  bfloat16 rounding: their per-token relative error is ~sqrt(2).
* **bf16 error** (`maximise_honest_error`): random search on the comparator's own
  measure (`token_errors`) of honest bfloat16 against honest float32 (bfloat16
  rounding is not differentiable).
* **extreme** (`extreme_inputs`): inputs scaled by 1e3..1e6, or one huge channel.

The Jacobian is the span's own backward (`BlockRunner.backward`) with one-hot output
gradients, batched: exact and through the public API. `FramingClient`
(testing/framing_client.py) sends what these find to a live server and reports it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trustswarm.models.runner import BlockRunner
from trustswarm.protocol.comparator import token_errors
from trustswarm.protocol.errors import TrustswarmError

OBJECTIVES = ("cancel", "bf16_error", "extreme")
JACOBIAN_CHUNK = 576  # rows of the Jacobian per batched backward


class FramingError(TrustswarmError):
    """A framing search asked for something it cannot do (bad shapes, spans, dtypes)."""


@dataclass(frozen=True)
class FramingSearch:
    """The result of `find_framing_input`."""

    hidden: torch.Tensor  # [1, T, H] float64: the input found
    positions: torch.Tensor  # [1, T] int64
    ratio: float  # ||out(x)|| / ||x|| at the end, in float64
    initial_ratio: float  # the same at x0
    iterations: int
    jacobians: int  # full Jacobians computed (Broyden updates in between)
    seconds: float


@dataclass(frozen=True)
class FramingInput:
    """One input worth sending, with how wrong its honest answers look to each other."""

    objective: str  # one of OBJECTIVES
    label: str  # how it was found, e.g. "cancel", "x1e+04", "channel 37 x1e+05"
    hidden: torch.Tensor  # [1, T, H] float32: what the client sends
    positions: torch.Tensor  # [1, T] int64
    error: float  # worst per-token relative error, honest bfloat16 vs float32
    abs_ratio: float  # worst max |a - b| / token RMS, same pair


def float64_runner(runner: BlockRunner, start: int, end: int) -> BlockRunner:
    """`runner` if it is float64 and covers start:end, else a float64 copy of the span."""
    if not runner.start <= start < end <= runner.end:
        raise FramingError(f"span {start}:{end} is not within {runner.start}:{runner.end}")
    if runner.dtype == torch.float64:
        return runner
    return BlockRunner(runner.model_dir, start, end, torch.float64)


def _positions(positions: torch.Tensor | None, tokens: int) -> torch.Tensor:
    if positions is None:
        return torch.arange(tokens, dtype=torch.long)[None]
    if tuple(positions.shape) != (1, tokens):
        raise FramingError(f"positions must be [1, {tokens}], got {tuple(positions.shape)}")
    return positions.long()


def span_jacobian(
    runner: BlockRunner, x: torch.Tensor, positions: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    """d out / d x of the span at x ([1, T, H]) as an [n, n] float64 matrix (n = T*H):
    row i is the gradient of output element i, from a batch of one-hot backwards."""
    _, tokens, hidden = x.shape
    n = tokens * hidden
    xs = x.to(runner.dtype)
    rows = []
    for first in range(0, n, JACOBIAN_CHUNK):
        count = min(JACOBIAN_CHUNK, n - first)
        grads = torch.zeros(count, n, dtype=runner.dtype)
        grads[torch.arange(count), torch.arange(first, first + count)] = 1.0
        batch = xs.expand(count, tokens, hidden).contiguous()
        pos = positions.expand(count, tokens)
        out = runner.backward(batch, grads.view(count, tokens, hidden), pos, None, start, end)
        rows.append(out.reshape(count, n).double())
    return torch.cat(rows)


@dataclass
class _Residual:
    """r(x) = out(x) / ||x|| (flattened) and its Jacobian from the span's."""

    runner: BlockRunner
    positions: torch.Tensor
    start: int
    end: int

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.runner.forward(x, self.positions, None, self.start, self.end).double()
        out = out.reshape(-1)
        return out / x.norm(), out

    def jacobian(self, jac: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        norm = x.norm()
        return jac / norm - torch.outer(out, x.reshape(-1)) / norm**3


def _lm_step(
    residual: _Residual, x: torch.Tensor, r: torch.Tensor, jr: torch.Tensor, damping: float
) -> tuple[torch.Tensor | None, float]:
    """One damped Gauss-Newton step (Marquardt scaling): the new (x, r, out, delta) if it
    lowers ||r||, else None; and the damping to use next."""
    jtj = jr.T @ jr
    diag = torch.diag(jtj).clamp_min(1e-12 * float(torch.diag(jtj).max()) + 1e-300)
    gradient = jr.T @ r
    loss = float(r @ r)
    for _ in range(8):
        delta = torch.linalg.solve(jtj + damping * torch.diag(diag), -gradient)
        x_new = x + delta.view_as(x)
        r_new, out_new = residual(x_new)
        if float(r_new @ r_new) < loss:
            return (x_new, r_new, out_new, delta), max(damping / 3, 1e-12)
        damping *= 4
    return None, damping


def find_framing_input(
    runner: BlockRunner,
    start: int,
    end: int,
    x0: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    iterations: int = 200,
    refresh: int = 1,
    target_ratio: float = 1e-9,
    jacobian_runner: BlockRunner | None = None,
    max_seconds: float = math.inf,
) -> FramingSearch:
    """Levenberg-Marquardt from x0 ([1, T, H]) for an input whose span output nearly
    cancels: minimises ||out(x)||^2 / ||x||^2 with float64 residuals. The Jacobian is
    recomputed every `refresh` accepted steps (or when a step fails) with
    `jacobian_runner` (default: the float64 runner; a float32 one is ~3x faster and
    good enough for the steps) and Broyden-updated in between."""
    if x0.ndim != 3 or x0.shape[0] != 1 or x0.shape[-1] != runner.hidden_size:
        raise FramingError(f"x0 must be [1, tokens, {runner.hidden_size}]")
    if iterations < 0 or refresh < 1:
        raise FramingError("iterations must be >= 0 and refresh >= 1")
    began = time.monotonic()
    pos = _positions(positions, x0.shape[1])
    residual = _Residual(float64_runner(runner, start, end), pos, start, end)
    jac_runner = jacobian_runner or residual.runner
    x = x0.detach().double().clone()
    r, out = residual(x)
    initial = float(r.norm())
    jr = residual.jacobian(span_jacobian(jac_runner, x, pos, start, end), x, out)
    jacobians, since, damping, done = 1, 0, 1e-2, 0
    while done < iterations:
        done += 1
        step, damping = _lm_step(residual, x, r, jr, damping)
        if step is None:
            if since == 0:
                break  # no descent even with a fresh Jacobian: a local minimum
            damping /= 4**8  # the failure was the stale Jacobian's, not the damping's
        else:
            x_new, r_new, out, delta = step
            # Broyden's rank-one update: the Jacobian along the step just taken.
            jr = jr + torch.outer(r_new - r - jr @ delta, delta) / float(delta @ delta)
            x, r, since = x_new, r_new, since + 1
        if float(r.norm()) <= target_ratio or time.monotonic() - began > max_seconds:
            break
        if step is None or since >= refresh:
            jr = residual.jacobian(span_jacobian(jac_runner, x, pos, start, end), x, out)
            jacobians, since = jacobians + 1, 0
    return FramingSearch(
        x, pos, float(r.norm()), initial, done, jacobians, time.monotonic() - began
    )


def honest_pair(
    f32: BlockRunner,
    bf16: BlockRunner,
    x: torch.Tensor,
    positions: torch.Tensor,
    start: int,
    end: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The honest float32 and bfloat16 answers to the float32 request x."""
    request = x.float()
    return (
        f32.forward(request, positions, None, start, end),
        bf16.forward(request, positions, None, start, end),
    )


def honest_error(
    f32: BlockRunner,
    bf16: BlockRunner,
    x: torch.Tensor,
    positions: torch.Tensor,
    start: int,
    end: int,
) -> tuple[float, float]:
    """Worst per-token (relative error, max-abs ratio) of honest bfloat16 against honest
    float32 for the float32 request x, as the comparator measures them."""
    a, b = honest_pair(f32, bf16, x, positions, start, end)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf, math.inf
    errors = token_errors(b, a)
    return float(errors.rel_error.max()), float(errors.abs_ratio.max())


def maximise_honest_error(
    f32: BlockRunner,
    bf16: BlockRunner,
    x0: torch.Tensor,
    positions: torch.Tensor,
    start: int,
    end: int,
    *,
    iterations: int = 200,
    rng: random.Random | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Random search from x0 for a larger honest bfloat16-vs-float32 error: Gaussian
    moves at log-uniform scales (1e-5..1e-1 of |x|) of the whole input or of a few
    channels, kept when the worst token error (then the max-abs ratio) grows."""
    rng = rng or random.Random(0)
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    best = x0.detach().float().clone()
    best_key = honest_error(f32, bf16, best, positions, start, end)
    for _ in range(iterations):
        scale = 10 ** rng.uniform(-5, -1) * float(best.norm()) / math.sqrt(best.numel())
        move = torch.randn(best.shape, generator=gen) * scale
        if rng.random() < 0.5:  # a few channels only
            keep = torch.rand(best.shape, generator=gen) < 8 / best.shape[-1]
            move = move * keep * 10
        candidate = best + move
        key = honest_error(f32, bf16, candidate, positions, start, end)
        if math.isfinite(key[0]) and key > best_key:
            best, best_key = candidate, key
    return best, best_key[0], best_key[1]


def extreme_inputs(
    x0: torch.Tensor, scales: tuple[float, ...] = (1e3, 1e4, 1e5, 1e6)
) -> list[tuple[str, torch.Tensor]]:
    """x0 scaled by each factor, and x0 with one channel (its largest) set to factor x
    the token's RMS: labelled float32 inputs."""
    x = x0.detach().float()
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    channel = int(x.abs().amax(dim=tuple(range(x.ndim - 1))).argmax())
    out = []
    for s in scales:
        out.append((f"x{s:.0e}", x * s))
        spiked = x.clone()
        spiked[..., channel] = s * rms[..., 0]
        out.append((f"channel {channel} = {s:.0e} rms", spiked))
    return out


def framing_inputs(
    runners: tuple[BlockRunner, BlockRunner, BlockRunner],
    start: int,
    end: int,
    x0: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    lm_iterations: int = 200,
    search_iterations: int = 200,
    rng: random.Random | None = None,
    max_seconds: float = math.inf,
    progress: Callable[[str], None] | None = None,
) -> list[FramingInput]:
    """All three objectives from one seed x0, best first. `runners` is (float64 or
    float32 for the residuals, float32, bfloat16), each covering start:end."""
    search_runner, f32, bf16 = runners
    pos = _positions(positions, x0.shape[1])
    found = find_framing_input(
        search_runner,
        start,
        end,
        x0,
        positions=pos,
        iterations=lm_iterations,
        jacobian_runner=f32,
        max_seconds=max_seconds,
    )
    if progress:
        progress(f"cancel {start}:{end}: ratio {found.initial_ratio:.3g} -> {found.ratio:.3g}")
    cancel = found.hidden.float()
    results = [
        FramingInput("cancel", "cancel", cancel, pos, *_err(runners, cancel, pos, start, end))
    ]
    best, err, ratio = maximise_honest_error(
        f32, bf16, cancel, pos, start, end, iterations=search_iterations, rng=rng
    )
    results.append(FramingInput("bf16_error", "random search from cancel", best, pos, err, ratio))
    for label, x in extreme_inputs(x0):
        results.append(FramingInput("extreme", label, x, pos, *_err(runners, x, pos, start, end)))
    return sorted(results, key=lambda f: -f.error if math.isfinite(f.error) else 0.0)


def _err(
    runners: tuple[BlockRunner, BlockRunner, BlockRunner],
    x: torch.Tensor,
    positions: torch.Tensor,
    start: int,
    end: int,
) -> tuple[float, float]:
    return honest_error(runners[1], runners[2], x, positions, start, end)
