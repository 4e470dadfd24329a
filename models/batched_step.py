"""Several sessions' inference steps over one span as one batched forward.

Each session keeps its own KV cache. For one batched pass their caches are copied into a
temporary cache laid out per row as [past | padding | new tokens | query padding]; a 2-D
padding mask hides the padding, so transformers' own causal mask lets every real token see
exactly what it sees in an unbatched step (keys are position-encoded when cached, so their
order in the cache does not matter). Rows never mix in any op, so one session's input
cannot change another's output. Afterwards each session's new keys and values are appended
to its own cache. The error against unbatched steps is rounding only (tests and
bench/batching.py measure it against the comparator's tolerances).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .runner import BlockRunner, InferenceCache, RunnerError


@dataclass(frozen=True)
class StepRequest:
    """One session's step, as BlockRunner.step takes it."""

    cache: InferenceCache
    hidden_states: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.cache.batch_size

    @property
    def new_tokens(self) -> int:
        return int(self.hidden_states.shape[1]) if self.hidden_states.ndim == 3 else 0


@dataclass(frozen=True)
class BatchLimits:
    """How much one batched pass may hold. The padding bounds keep the waste a long
    session (or a prefill) would impose on short decode steps batched with it: steps that
    would pad too much wait for a later pass instead (node/step_batcher.py)."""

    max_steps: int = 8  # sessions in one batch
    max_query_cells: int = 256  # rows x the longest step's new tokens
    # rows x (the longest past + the longest step): the temporary padded cache a pass
    # copies the members' pasts into (8 sessions of 2048 tokens; ~250 MB for 10 blocks
    # of SmolLM2 in float32)
    max_kv_cells: int = 16 * 1024
    # Padded cells may exceed the real ones by at most this fraction (queries, keys).
    max_query_padding: float = 0.25
    max_kv_padding: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_query_cells", "max_kv_cells"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"BatchLimits.{name} must be an integer >= 1, got {value!r}")
        for name in ("max_query_padding", "max_kv_padding"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"BatchLimits.{name} must be a finite number >= 0")

    def fits(self, steps: Sequence[StepRequest]) -> bool:
        """Whether these steps may run as one pass (a single step always may)."""
        if len(steps) <= 1:
            return True
        if len(steps) > self.max_steps or len({s.cache.span for s in steps}) != 1:
            return False
        rows = sum(s.rows for s in steps)
        new = max(s.new_tokens for s in steps)
        past = max(s.cache.length for s in steps)
        query = rows * new
        kv = rows * (past + new)
        real_query = sum(s.rows * s.new_tokens for s in steps)
        real_kv = sum(s.rows * (s.cache.length + s.new_tokens) for s in steps)
        return (
            query <= self.max_query_cells
            and kv <= self.max_kv_cells
            and query <= real_query * (1 + self.max_query_padding)
            and kv <= real_kv * (1 + self.max_kv_padding)
        )


@dataclass(frozen=True)
class _Checked:
    request: StepRequest
    hidden: torch.Tensor  # [b, t, H] in the runner's dtype
    positions: torch.Tensor  # [b, t]
    mask: torch.Tensor | None  # [b, past + t] or None


def run_steps(
    runner: BlockRunner, requests: Sequence[StepRequest], limits: BatchLimits | None = None
) -> list[torch.Tensor | Exception]:
    """Each request's output, or the error that request alone caused. Requests that pass
    BlockRunner.check_step run as one pass when `limits` allow; if that pass fails, each
    runs alone (the caches are untouched until the pass succeeded)."""
    limits = limits or BatchLimits()
    if len({id(r.cache) for r in requests}) != len(requests):
        raise RunnerError("one session's cache appears twice in a batch")
    results: list[torch.Tensor | Exception] = [RunnerError("not run")] * len(requests)
    checked: list[tuple[int, _Checked]] = []
    for i, request in enumerate(requests):
        try:
            h, pos, mask = runner.check_step(
                request.cache, request.hidden_states, request.position_ids, request.attention_mask
            )
        except Exception as exc:  # its own bad input (RunnerError), reported to it alone
            results[i] = exc
            continue
        checked.append((i, _Checked(request, h, pos, mask)))
    if len(checked) > 1 and limits.fits([c.request for _, c in checked]):
        steps = [c for _, c in checked]
        try:
            kv, out, past = _batched_pass(runner, steps)
        except Exception:  # noqa: S110 - rerun one by one: whatever failed fails alone
            pass
        else:
            for (i, c), row in zip(checked, _row_offsets(steps), strict=True):
                results[i] = _append(c, kv, out, row, past)
            return results
    for i, c in checked:
        results[i] = _alone(runner, c)
    return results


def _alone(runner: BlockRunner, c: _Checked) -> torch.Tensor | Exception:
    try:
        return runner.step(c.request.cache, c.hidden, c.positions, c.mask)
    except Exception as exc:  # the session's own failure, reported to it alone
        return exc


def _batched_pass(
    runner: BlockRunner, steps: list[_Checked]
) -> tuple[DynamicCache, torch.Tensor, int]:
    """One pass over all steps through a temporary cache: (that cache, output, padded past)."""
    span = steps[0].request.cache.span
    rows = sum(s.request.rows for s in steps)
    new = max(s.hidden.shape[1] for s in steps)
    past = max(s.request.cache.length for s in steps)
    h = torch.zeros(rows, new, runner.hidden_size, dtype=runner.dtype)
    positions = torch.zeros(rows, new, dtype=torch.int64)
    mask = torch.zeros(rows, past + new, dtype=torch.bool)
    for s, row in zip(steps, _row_offsets(steps), strict=True):
        b, t, length = s.request.rows, s.hidden.shape[1], s.request.cache.length
        h[row : row + b, :t] = s.hidden
        positions[row : row + b, :t] = s.positions
        positions[row : row + b, t:] = s.positions[:, -1:]  # query padding: any valid position
        given = s.mask.to(torch.bool) if s.mask is not None else None
        mask[row : row + b, :length] = True if given is None else given[:, :length]
        mask[row : row + b, past : past + t] = True if given is None else given[:, length:]
    kv = DynamicCache(config=runner.config)
    if past:
        for layer in range(*span):
            keys, values = _padded_past(steps, layer, rows, past)
            kv.update(keys, values, layer)
    batch = InferenceCache(span=span, batch_size=rows, max_length=past + new, kv=kv, length=past)
    # The sessions' caches are untouched until here: a failed pass can be rerun step by step.
    return kv, runner.step(batch, h, positions, mask), past


def _row_offsets(steps: list[_Checked]) -> list[int]:
    offsets, row = [], 0
    for s in steps:
        offsets.append(row)
        row += s.request.rows
    return offsets


def _padded_past(
    steps: list[_Checked], layer: int, rows: int, past: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every session's cached keys and values of `layer`, zero-padded to `past` tokens."""
    template = next(
        s.request.cache.kv.layers[layer].keys for s in steps if s.request.cache.length > 0
    )
    shape = (rows, template.shape[1], past, template.shape[3])
    keys = torch.zeros(shape, dtype=template.dtype)
    values = torch.zeros(shape, dtype=template.dtype)
    for s, row in zip(steps, _row_offsets(steps), strict=True):
        b, length = s.request.rows, s.request.cache.length
        if length:
            cached = s.request.cache.kv.layers[layer]
            keys[row : row + b, :, :length] = cached.keys
            values[row : row + b, :, :length] = cached.values
    return keys, values


def _append(
    s: _Checked, kv: DynamicCache, out: torch.Tensor, row: int, past: int
) -> torch.Tensor | Exception:
    """Append one session's new keys and values to its own cache; its rows of `out`."""
    cache, b, t = s.request.cache, s.request.rows, s.hidden.shape[1]
    try:
        for layer in range(*cache.span):
            batched = kv.layers[layer]
            cache.kv.update(
                batched.keys[row : row + b, :, past : past + t],
                batched.values[row : row + b, :, past : past + t],
                layer,
            )
    except Exception as exc:  # out of memory: this session alone is lost
        cache.broken = True  # some layers may hold the new tokens, others not
        return exc
    cache.length += t
    return out[row : row + b, :t]
