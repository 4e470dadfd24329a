"""Inference steps of different sessions, batched while the server's compute is busy.

A step that finds nobody draining the queue takes the compute limiter and runs at once
(an idle server adds no delay: there is no collection timer). Steps that arrive
meanwhile wait; when the limiter is free again, one of them takes every waiting step
that fits the batch limits (the oldest always, then later ones in arrival order) and
runs them as one pass (models/batched_step.py). The window is thus "while the previous
pass ran": under load, concurrent sessions' steps fall into the same pass by themselves.
Each step gets its own output or its own error; the handler signs and sends its answer.

Only float32 servers batch. On SmolLM2 blocks 0:10 (8 sessions, 16 decode steps each,
bench/batching.py --sections rounding) a batched float32 step differs from the same
step alone by at most 3.8e-6 per token (the comparator allows 1e-4); in bfloat16 by up
to 3.6e-2, close to the bfloat16 bounds that were calibrated on unbatched answers, so a
bfloat16 server runs every step alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import trio

from trustswarm.models.batched_step import BatchLimits, StepRequest, run_steps
from trustswarm.models.runner import BlockRunner, RunnerError


@dataclass(eq=False)
class _Waiting:
    request: StepRequest
    done: trio.Event = field(default_factory=trio.Event)
    result: torch.Tensor | Exception | None = None


@dataclass(eq=False)
class StepBatcher:
    """One server's step queue. Steps of different spans (sub-spans of the served one)
    never share a pass; they wait for a later one."""

    runner: BlockRunner
    compute: trio.CapacityLimiter
    limits: BatchLimits = field(default_factory=BatchLimits)
    batches_run: int = 0  # passes with more than one step (for tests and benchmarks)
    steps_batched: int = 0  # steps that ran in such passes
    _queue: deque[_Waiting] = field(default_factory=deque)
    _draining: bool = False
    _drained: trio.Event = field(default_factory=trio.Event)

    @property
    def queued(self) -> int:
        """Steps waiting for a pass."""
        return len(self._queue)

    @property
    def batching(self) -> bool:
        return self.runner.dtype == torch.float32 and self.limits.max_steps > 1

    async def step(self, request: StepRequest) -> torch.Tensor:
        """`request`'s output (as BlockRunner.step returns it); its own error if it fails."""
        waiting = _Waiting(request)
        self._queue.append(waiting)
        try:
            while not waiting.done.is_set():
                if self._draining:
                    await self._drained.wait()
                else:
                    await self._drain_once()
        finally:
            if not waiting.done.is_set() and waiting in self._queue:
                self._queue.remove(waiting)  # cancelled while waiting: never run it
        if isinstance(waiting.result, Exception):
            raise waiting.result
        if waiting.result is None:
            raise RunnerError("step was not run")
        return waiting.result

    async def _drain_once(self) -> None:
        self._draining = True
        batch: list[_Waiting] = []
        try:
            async with self.compute:
                batch = self._take()
                await trio.to_thread.run_sync(self._run, batch)
        finally:
            for waiting in batch:
                waiting.done.set()
            self._draining = False
            drained, self._drained = self._drained, trio.Event()
            drained.set()

    def _take(self) -> list[_Waiting]:
        """The oldest waiting step and every later one that fits with it."""
        batch = [self._queue.popleft()]
        if not self.batching:
            return batch
        for waiting in list(self._queue):
            if len(batch) >= self.limits.max_steps:
                break
            if any(w.request.cache is waiting.request.cache for w in batch):
                continue  # one session's next step: after this one
            candidate = [w.request for w in batch] + [waiting.request]
            if self.limits.fits(candidate):
                batch.append(waiting)
                self._queue.remove(waiting)
        return batch

    def _run(self, batch: list[_Waiting]) -> None:
        """In the worker thread: every step of `batch` gets its result (never raises)."""
        try:
            results = run_steps(self.runner, [w.request for w in batch], self.limits)
        except Exception as exc:  # a bug in batching: every step of this pass reports it
            results = [exc] * len(batch)
        for waiting, result in zip(batch, results, strict=True):
            waiting.result = result
        if len(batch) > 1:
            self.batches_run += 1
            self.steps_batched += len(batch)
