"""Torch work off the trio event loop, one computation at a time per limiter."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


async def run_limited(limiter: trio.CapacityLimiter, fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` in a worker thread while holding `limiter`.

    The thread is never abandoned on cancel: it would keep running past the limiter
    (two computes at once) and, at shutdown, into interpreter teardown, where libtorch
    aborts the process ("terminate called without an active exception", exit -6).
    A request's compute is bounded by the request limits, so waiting for it is short.
    """
    async with limiter:
        return await trio.to_thread.run_sync(fn, *args)
