"""Batching across clients (issue 14): several sessions' inference steps as one batched
forward. The batched pass against the same steps run one by one (tiny model, different
lengths, left padding), its limits, the server's step queue and its switch. Real
servers on loopback with concurrent clients: tests/test_batching_swarm.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustswarm.models.batched_step import BatchLimits, StepRequest, run_steps
from trustswarm.models.runner import BlockRunner, RunnerError
from trustswarm.models.store import ModelDir
from trustswarm.node.step_batcher import StepBatcher

pytestmark = pytest.mark.timeout(300)
ATOL = 2e-5
LOOSE = BatchLimits(max_query_padding=1000.0, max_kv_padding=1000.0)


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> BlockRunner:
    return BlockRunner(ModelDir.open(tiny_model_dir), 0, 6)


@dataclass
class Plan:
    """One session: its rows' left padding and the new tokens of each of its steps."""

    pads: list[int]
    steps: list[int]


def _inputs(plan: Plan, stage: int, seed: int, hidden: int):
    """(hidden, positions, mask) of `plan`'s step `stage` (mask covers past + new)."""
    g = torch.Generator().manual_seed(seed * 1000 + stage)
    rows, t = len(plan.pads), plan.steps[stage]
    past = sum(plan.steps[:stage])
    total = past + t
    mask = torch.ones(rows, total, dtype=torch.long)
    for r, pad in enumerate(plan.pads):
        mask[r, : min(pad, plan.steps[0] - 1)] = 0  # left padding inside the prompt
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    return torch.randn(rows, t, hidden, generator=g), positions, mask


def _sequential_and_batched(runner: BlockRunner, plans: list[Plan], limits: BatchLimits):
    """Every stage's outputs, step by step and batched (sessions without a step at some
    stage sit it out)."""
    alone = [runner.new_cache(len(p.pads), 64) for p in plans]
    together = [runner.new_cache(len(p.pads), 64) for p in plans]
    stages = max(len(p.steps) for p in plans)
    pairs = []
    for stage in range(stages):
        live = [i for i, p in enumerate(plans) if stage < len(p.steps)]
        inputs = {i: _inputs(plans[i], stage, i, runner.hidden_size) for i in live}
        expected = {i: runner.step(alone[i], *inputs[i]) for i in live}
        requests = [StepRequest(together[i], *inputs[i]) for i in live]
        got = run_steps(runner, requests, limits)
        for i, out in zip(live, got, strict=True):
            pairs.append((expected[i], out, inputs[i][2][:, -plans[i].steps[stage] :]))
    return pairs, alone, together


def _assert_close(expected: torch.Tensor, got: torch.Tensor, mask: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor), got
    assert got.shape == expected.shape
    real = mask.bool()  # padding tokens' outputs are nobody's concern
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=1e-5)


plans = st.builds(
    Plan,
    pads=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    steps=st.lists(st.integers(1, 3), min_size=0, max_size=3).flatmap(
        lambda rest: st.integers(1, 12).map(lambda first: [first, *rest])
    ),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sessions=st.lists(plans, min_size=1, max_size=5))
def test_batched_steps_equal_sequential_steps(runner: BlockRunner, sessions: list[Plan]) -> None:
    pairs, alone, together = _sequential_and_batched(runner, sessions, LOOSE)
    for expected, got, mask in pairs:
        _assert_close(expected, got, mask)
    for a, b in zip(alone, together, strict=True):
        assert a.length == b.length and not b.broken
        for layer in range(*b.span):
            torch.testing.assert_close(
                b.kv.layers[layer].keys, a.kv.layers[layer].keys, atol=ATOL, rtol=1e-5
            )
            torch.testing.assert_close(
                b.kv.layers[layer].values, a.kv.layers[layer].values, atol=ATOL, rtol=1e-5
            )


def test_different_prompt_lengths_then_decode_with_default_limits(runner: BlockRunner) -> None:
    sessions = [Plan([0], [5, 1, 1, 1]), Plan([0], [6, 1, 1, 1]), Plan([0, 2], [6, 1, 1, 1])]
    assert BatchLimits().fits(
        [
            StepRequest(runner.new_cache(len(p.pads), 64), torch.zeros(len(p.pads), 1, 64))
            for p in sessions
        ]
    )
    pairs, _, _ = _sequential_and_batched(runner, sessions, BatchLimits())
    for expected, got, mask in pairs:
        _assert_close(expected, got, mask)


def _decode_request(runner: BlockRunner, past: int, rows: int = 1, seed: int = 0) -> StepRequest:
    cache = runner.new_cache(rows, 128)
    g = torch.Generator().manual_seed(seed)
    runner.step(cache, torch.randn(rows, past, runner.hidden_size, generator=g))
    return StepRequest(cache, torch.randn(rows, 1, runner.hidden_size, generator=g))


def test_one_bad_member_gets_the_error_alone(runner: BlockRunner) -> None:
    good = [_decode_request(runner, n, seed=n) for n in (3, 5, 4)]
    reference = [runner.new_cache(1, 128) for _ in good]
    for ref, n in zip(reference, (3, 5, 4), strict=True):
        g = torch.Generator().manual_seed(n)
        runner.step(ref, torch.randn(1, n, runner.hidden_size, generator=g))
    expected = [runner.step(ref, r.hidden_states) for ref, r in zip(reference, good, strict=True)]
    full = runner.new_cache(1, 4)
    runner.step(full, torch.zeros(1, 4, runner.hidden_size))
    broken = runner.new_cache(1, 8)
    broken.broken = True
    bad = [
        StepRequest(runner.new_cache(1, 8), torch.zeros(1, 1, 7)),  # wrong hidden size
        StepRequest(runner.new_cache(2, 8), torch.zeros(1, 1, runner.hidden_size)),  # batch
        StepRequest(full, torch.zeros(1, 1, runner.hidden_size)),  # past its max_length
        StepRequest(broken, torch.zeros(1, 1, runner.hidden_size)),
        StepRequest(
            runner.new_cache(1, 8),
            torch.zeros(1, 1, runner.hidden_size),
            attention_mask=torch.ones(1, 5, dtype=torch.long),  # wrong mask length
        ),
    ]
    results = run_steps(runner, [good[0], *bad, good[1], good[2]], LOOSE)
    assert all(isinstance(r, RunnerError) for r in results[1:-2])
    assert full.length == 4 and not full.broken
    for exp, got in zip(expected, [results[0], results[-2], results[-1]], strict=True):
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=1e-5)


def test_extreme_member_does_not_touch_its_batch_mates(runner: BlockRunner) -> None:
    """Finite but extreme hidden states (and a member masking everything) overflow in
    their own rows only: the others' answers are what they are alone."""
    lengths = (3, 6)
    good = [_decode_request(runner, n, seed=n) for n in lengths]
    reference = []
    for n, r in zip(lengths, good, strict=True):
        cache = runner.new_cache(1, 128)
        g = torch.Generator().manual_seed(n)
        runner.step(cache, torch.randn(1, n, runner.hidden_size, generator=g))
        reference.append(runner.step(cache, r.hidden_states))
    huge = _decode_request(runner, 4, rows=2, seed=9)
    huge = StepRequest(huge.cache, torch.full((2, 1, runner.hidden_size), 3.0e38))
    masked = _decode_request(runner, 2, seed=11)
    masked = StepRequest(
        masked.cache, masked.hidden_states, attention_mask=torch.zeros(1, 3, dtype=torch.long)
    )
    results = run_steps(runner, [good[0], huge, masked, good[1]], LOOSE)
    for exp, got in zip(reference, [results[0], results[3]], strict=True):
        assert isinstance(got, torch.Tensor) and bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=1e-5)


def test_a_cache_twice_in_one_batch_is_refused(runner: BlockRunner) -> None:
    request = _decode_request(runner, 2)
    with pytest.raises(RunnerError):
        run_steps(runner, [request, request])


# -- limits -----------------------------------------------------------------------------


def _shaped(runner: BlockRunner, rows: int, past: int, new: int, span=(0, 6)) -> StepRequest:
    cache = runner.new_cache(rows, 4096, *span)
    cache.length = past  # shape only: fits() never looks at the keys
    return StepRequest(cache, torch.zeros(rows, new, runner.hidden_size))


shapes = st.tuples(st.integers(1, 4), st.integers(0, 300), st.integers(1, 20))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(shapes, min_size=1, max_size=10),
    max_steps=st.integers(1, 8),
    padding=st.floats(0, 2),
)
def test_fits_bounds_the_padding(runner: BlockRunner, steps, max_steps, padding) -> None:
    limits = BatchLimits(
        max_steps=max_steps,
        max_query_cells=64,
        max_kv_cells=2000,
        max_query_padding=padding,
        max_kv_padding=padding,
    )
    requests = [_shaped(runner, *s) for s in steps]
    if not limits.fits(requests):
        assert len(requests) > 1
        return
    if len(requests) == 1:
        return
    rows = sum(r for r, _, _ in steps)
    new = max(n for _, _, n in steps)
    past = max(p for _, p, _ in steps)
    assert len(steps) <= max_steps
    assert rows * new <= 64 and rows * (past + new) <= 2000
    assert rows * new <= (1 + padding) * sum(r * n for r, _, n in steps)
    assert rows * (past + new) <= (1 + padding) * sum(r * (p + n) for r, p, n in steps)


def test_fits_never_mixes_spans_and_rejects_bad_limits(runner: BlockRunner) -> None:
    a, b = _shaped(runner, 1, 4, 1), _shaped(runner, 1, 4, 1, span=(0, 3))
    assert BatchLimits().fits([a, _shaped(runner, 1, 4, 1)])
    assert not BatchLimits().fits([a, b])
    # a decode step does not ride with a prefill it would pad 20-fold
    assert not BatchLimits().fits([_shaped(runner, 1, 0, 20), a])
    for bad in ({"max_steps": 0}, {"max_kv_cells": 1.5}, {"max_query_padding": float("nan")}):
        with pytest.raises(ValueError):
            BatchLimits(**bad)


# -- the server's step queue ------------------------------------------------------------


def test_queued_steps_run_as_one_pass_with_their_own_results(runner: BlockRunner) -> None:
    """While the compute limiter is busy, steps queue; then they run as one pass and
    each gets its own output (or its own error)."""
    requests = [_decode_request(runner, n, seed=n) for n in (2, 3, 4, 5)]
    snapshot = [(r.cache.length, r.hidden_states) for r in requests]
    bad = StepRequest(runner.new_cache(1, 8), torch.zeros(1, 1, 5))
    outputs: dict[int, torch.Tensor | Exception] = {}

    async def main() -> StepBatcher:
        compute = trio.CapacityLimiter(1)
        batcher = StepBatcher(runner, compute)

        async def one(i: int, request: StepRequest) -> None:
            try:
                outputs[i] = await batcher.step(request)
            except RunnerError as exc:
                outputs[i] = exc

        async with trio.open_nursery() as nursery:
            await compute.acquire_on_behalf_of("someone else")
            for i, request in enumerate([*requests, bad]):
                nursery.start_soon(one, i, request)
            await trio.testing.wait_all_tasks_blocked()
            compute.release_on_behalf_of("someone else")
        return batcher

    batcher = trio.run(main)
    assert batcher.batches_run == 1 and batcher.steps_batched == 5
    assert isinstance(outputs[4], RunnerError)
    for i, (length, hidden) in enumerate(snapshot):
        cache = runner.new_cache(1, 128)
        g = torch.Generator().manual_seed(length)
        runner.step(cache, torch.randn(1, length, runner.hidden_size, generator=g))
        torch.testing.assert_close(outputs[i], runner.step(cache, hidden), atol=ATOL, rtol=1e-5)
        assert requests[i].cache.length == length + 1


def test_a_lone_step_runs_at_once_and_a_cancelled_one_never(runner: BlockRunner) -> None:
    """No collection timer: with the clock stopped, a lone step still completes. A step
    cancelled while it waits in the queue never runs (its cache is untouched)."""
    request = _decode_request(runner, 3)
    waiting = _decode_request(runner, 2)

    async def main() -> StepBatcher:
        compute = trio.CapacityLimiter(1)
        batcher = StepBatcher(runner, compute)
        await batcher.step(request)
        async with trio.open_nursery() as nursery:
            await compute.acquire_on_behalf_of("busy")
            nursery.start_soon(batcher.step, waiting)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        compute.release_on_behalf_of("busy")
        return batcher

    batcher = trio.run(main, clock=trio.testing.MockClock(rate=0))
    assert request.cache.length == 4 and batcher.batches_run == 0
    assert waiting.cache.length == 2 and batcher.queued == 0


def test_bfloat16_servers_run_every_step_alone(tiny_model_dir: Path) -> None:
    runner = BlockRunner(ModelDir.open(tiny_model_dir), 0, 2, torch.bfloat16)
    assert not StepBatcher(runner, trio.CapacityLimiter(1)).batching


def test_node_start_batches_unless_told_not_to(tmp_path: Path) -> None:
    import argparse

    from trustswarm.node.cli import register
    from trustswarm.node.config import ServerConfig

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    base = ["node", "start", "--model", str(tmp_path), "--identity", "k", "--new-swarm"]
    assert parser.parse_args(base).batch_steps is True
    assert parser.parse_args([*base, "--no-batching"]).batch_steps is False
    assert ServerConfig().batch_steps is True
    with pytest.raises(ValueError):
        ServerConfig(batch_steps="no")  # type: ignore[arg-type]


def test_sub_span_sessions_batch_and_spans_never_mix(runner: BlockRunner) -> None:
    """Sessions on blocks 2:5 of a 0:6 server batch among themselves; a 0:6 session
    queued with them runs in a pass of its own."""
    g = torch.Generator().manual_seed(7)
    subs, refs = [], []
    for n in (2, 5):
        cache, ref = runner.new_cache(1, 32, 2, 5), runner.new_cache(1, 32, 2, 5)
        prompt = torch.randn(1, n, runner.hidden_size, generator=g)
        runner.step(cache, prompt)
        runner.step(ref, prompt)
        subs.append(StepRequest(cache, torch.randn(1, 1, runner.hidden_size, generator=g)))
        refs.append(ref)
    full = _decode_request(runner, 3)
    outputs: list = [None] * 3

    async def main() -> StepBatcher:
        compute = trio.CapacityLimiter(1)
        batcher = StepBatcher(runner, compute)

        async def one(i: int, request: StepRequest) -> None:
            outputs[i] = await batcher.step(request)

        async with trio.open_nursery() as nursery:
            await compute.acquire_on_behalf_of("busy")
            for i, request in enumerate([subs[0], full, subs[1]]):
                nursery.start_soon(one, i, request)
            await trio.testing.wait_all_tasks_blocked()
            compute.release_on_behalf_of("busy")
        return batcher

    batcher = trio.run(main)
    assert batcher.batches_run == 1 and batcher.steps_batched == 2
    for got, ref, request in zip([outputs[0], outputs[2]], refs, subs, strict=True):
        torch.testing.assert_close(
            got, runner.step(ref, request.hidden_states), atol=ATOL, rtol=1e-5
        )
    assert full.cache.length == 4 and outputs[1].shape == (1, 1, runner.hidden_size)
