"""Batching across clients (issue 14): several sessions' inference steps as one batched
forward. The batched pass against the same steps run one by one (tiny model, different
lengths, left padding), its limits, the server's step queue, then real servers on
loopback with concurrent clients and a hostile one."""

from __future__ import annotations

import threading
import time
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


# -- real servers on loopback -----------------------------------------------------------

PROMPTS = [
    torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 5, 8, 4)
]
NEW_TOKENS = 16


def _generate(model, prompt: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and every step's logits."""
    out = model.generate(
        prompt,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences[0].tolist(), torch.stack(out.logits)


def _assert_same_generations(got: list, alone: list) -> None:
    for (tokens, logits), (tokens_alone, logits_alone) in zip(got, alone, strict=True):
        assert tokens == tokens_alone
        torch.testing.assert_close(logits, logits_alone, atol=1e-4, rtol=0)


def _generate_concurrently(models: list, prompts: list[torch.Tensor]) -> list:
    """Every model generates its prompt at the same time (one thread each)."""
    results: list = [None] * len(models)
    barrier = threading.Barrier(len(models))

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = _generate(models[i], prompts[i])
        except BaseException as exc:  # reported by the test below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    for result in results:
        if not isinstance(result, tuple):
            raise AssertionError(f"a client failed: {result!r}")
    return results


def _hostile(swarm, target, stop: threading.Event, replies: list[str]) -> None:
    """A bare peer that keeps sending its own extreme or malformed steps."""
    from trustswarm.protocol import protocols
    from trustswarm.protocol.codec import Message, decode_message
    from trustswarm.protocol.framing import read_frame, send_message
    from trustswarm.protocol.identity import Identity
    from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host

    start, end = target.server.runner.start, target.server.runner.end
    hidden = target.server.runner.hidden_size
    steps = [
        {"hidden_states": torch.full((2, 1, hidden), 3.0e38)},
        {"hidden_states": torch.randn(2, 1, hidden), "attention_mask": torch.zeros(2, 2).long()},
        {"hidden_states": torch.randn(2, 1, hidden), "attention_mask": torch.ones(2, 7).long()},
        {"hidden_states": torch.randn(2, 40, hidden)},  # past the session's max_length
    ]

    async def run() -> None:
        host = make_host(Identity.generate())
        async with running_host(host, []):
            info = parse_peer_addr(target.addrs[0])
            await host.connect(info)
            round_ = 0
            while not stop.is_set():
                stream = await host.new_stream(info.peer_id, [protocols.INFERENCE])
                opening = {
                    "start": str(start), "end": str(end), "session_id": f"hostile-{round_:08d}",
                    "max_length": "32", "batch_size": "2",
                }  # fmt: skip
                await send_message(stream, Message(meta=opening))
                with trio.fail_after(20):
                    session = decode_message(await read_frame(stream)).meta["opened"]
                for n in range(2):
                    tensors = (
                        {"hidden_states": torch.randn(2, 1, hidden)}
                        if n == 0
                        else steps[round_ % 4]
                    )
                    step = Message(tensors=tensors, meta={"session_id": session, "step": str(n)})
                    await send_message(stream, step)
                    with trio.fail_after(20):
                        reply = decode_message(await read_frame(stream)).meta
                    replies.append(reply.get("error", "answer"))
                await stream.close()
                round_ += 1

    swarm.loop.run(run)


@pytest.fixture(scope="module")
def batching_swarm(tiny_model_dir: Path):
    from trustswarm.testing.local_swarm import LocalSwarm

    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server((0, 3))
        swarm.start_server((3, 6))
        yield swarm
    finally:
        swarm.close()


def _clients(tiny_model_dir: Path, swarm, count: int) -> list:
    from trustswarm.client import DistributedModelForCausalLM

    return [
        DistributedModelForCausalLM.from_pretrained(tiny_model_dir, swarm.initial_peers)
        for _ in range(count)
    ]


def _batched_steps(swarm) -> int:
    return sum(s.server.ctx.batcher.steps_batched for s in swarm.servers)


def test_concurrent_clients_generate_what_they_generate_alone(tiny_model_dir, batching_swarm):
    models = _clients(tiny_model_dir, batching_swarm, len(PROMPTS))
    try:
        alone = [_generate(m, p) for m, p in zip(models, PROMPTS, strict=True)]
        before = _batched_steps(batching_swarm)
        together = _generate_concurrently(models, PROMPTS)
    finally:
        for m in models:
            m.close()
    _assert_same_generations(together, alone)
    assert _batched_steps(batching_swarm) > before  # their steps did share passes


def test_a_hostile_client_does_not_disturb_its_batch_mates(tiny_model_dir, batching_swarm):
    models = _clients(tiny_model_dir, batching_swarm, 3)
    stop, replies = threading.Event(), []
    target = batching_swarm.servers[0]
    try:
        alone = [_generate(m, p) for m, p in zip(models, PROMPTS[:3], strict=True)]
        hostile = threading.Thread(target=_hostile, args=(batching_swarm, target, stop, replies))
        hostile.start()
        deadline = time.monotonic() + 30
        while len(replies) < 2 and time.monotonic() < deadline:  # it is at work
            time.sleep(0.05)
        try:
            together = _generate_concurrently(models, PROMPTS[:3])
        finally:
            stop.set()
            hostile.join(60)
    finally:
        for m in models:
            m.close()
    _assert_same_generations(together, alone)
    assert "answer" in replies and any(r != "answer" for r in replies)  # it was served
    for m in models:  # nobody was banned or blamed
        assert not m.swarm.view.bans


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


def test_a_server_told_not_to_batch_runs_steps_alone(tiny_model_dir: Path) -> None:
    from trustswarm.client import DistributedModelForCausalLM
    from trustswarm.node.config import ServerConfig
    from trustswarm.testing.local_swarm import LocalSwarm

    swarm = LocalSwarm(tiny_model_dir)
    try:
        server = swarm.start_server((0, 6), config=ServerConfig(batch_steps=False))
        assert server.server.ctx.batcher is None
        with DistributedModelForCausalLM.from_pretrained(tiny_model_dir, swarm.initial_peers) as m:
            tokens = m.generate(PROMPTS[0], max_new_tokens=4, do_sample=False)
        assert tokens.shape == (1, PROMPTS[0].shape[1] + 4)
    finally:
        swarm.close()
