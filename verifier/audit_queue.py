"""The rules that keep client audits from crowding out anything else on a verifier.

* `Quota`: at most `limit` audits accepted per client peer id in any `window` seconds
  (sliding window; refused attempts do not count, so a refused client is admitted again
  as soon as its oldest accepted audit leaves the window).
* `FairQueue`: audits waiting to be judged, one FIFO per client, served round robin (one
  audit per client in turn, so a client with many audits queued cannot delay another's
  by more than one audit per client). When the queue is over its item or byte capacity,
  the oldest audit of the client holding the most bytes goes.
* `Priority`: reports first. Report reviews run their compute through `wrap`; the audit
  worker waits in `wait_idle` until no report is waiting for or holding compute.
* `budget_pause`: after judging an audit that took `c` seconds of compute, the audit
  worker rests `c * (1 - share) / share`, so audits use at most `share` of the time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from trustswarm.protocol.errors import TrustswarmError

T = TypeVar("T")
Compute = Callable[..., Awaitable]


class AuditQueueError(TrustswarmError, ValueError):
    """A quota, queue or budget setting out of range."""


@dataclass
class Quota:
    limit: int
    window: float
    max_keys: int = 10_000  # beyond this many clients, idle ones are forgotten
    _accepted: dict[str, deque[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.limit < 0 or not self.window > 0:
            raise AuditQueueError("a quota needs limit >= 0 and window > 0")

    def admit(self, key: str, now: float) -> bool:
        """True (and counted) if `key` has fewer than `limit` accepted in (now - window, now]."""
        since = now - self.window
        if len(self._accepted) > self.max_keys:
            for idle in [k for k, q in self._accepted.items() if not q or q[-1] <= since]:
                del self._accepted[idle]
        accepted = self._accepted.setdefault(key, deque())
        while accepted and accepted[0] <= since:
            accepted.popleft()
        if len(accepted) >= self.limit:
            return False
        accepted.append(now)
        return True


@dataclass
class FairQueue(Generic[T]):
    max_items: int
    max_bytes: int
    _queues: dict[str, deque[tuple[T, int]]] = field(default_factory=dict)
    _turns: deque[str] = field(default_factory=deque)  # clients with audits, in turn order
    _bytes: dict[str, int] = field(default_factory=dict)
    items: int = 0
    bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_bytes < 1:
            raise AuditQueueError("a queue needs max_items >= 1 and max_bytes >= 1")

    def __len__(self) -> int:
        return self.items

    def put(self, key: str, item: T, size: int) -> list[tuple[str, T]]:
        """Queue `item` (of `size` bytes, at most max_bytes) for `key`; returns what had to
        go to stay within capacity (oldest of the heaviest client first)."""
        if not 0 <= size <= self.max_bytes:
            raise AuditQueueError(f"an item of {size} bytes does not fit in {self.max_bytes}")
        if key not in self._queues:
            self._queues[key] = deque()
            self._bytes[key] = 0
            self._turns.append(key)
        self._queues[key].append((item, size))
        self._bytes[key] += size
        self.items += 1
        self.bytes += size
        evicted = []
        while self.items > self.max_items or self.bytes > self.max_bytes:
            heaviest = max(self._turns, key=lambda k: (self._bytes[k], len(self._queues[k])))
            evicted.append((heaviest, self._pop(heaviest)))
        return evicted

    def get(self) -> tuple[str, T] | None:
        """The next client's oldest item, round robin; None when empty."""
        if not self._turns:
            return None
        key = self._turns[0]
        item = self._pop(key)
        if key in self._queues:  # more left: its next turn comes after everyone else's
            self._turns.remove(key)
            self._turns.append(key)
        return key, item

    def queued(self, key: str) -> int:
        return len(self._queues.get(key, ()))

    def _pop(self, key: str) -> T:
        queue = self._queues[key]
        item, size = queue.popleft()
        self._bytes[key] -= size
        self.items -= 1
        self.bytes -= size
        if not queue:
            del self._queues[key], self._bytes[key]
            self._turns.remove(key)
        return item


class Priority:
    """Reports before audits: `wrap` marks compute done for a report; audits wait idle."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()

    def wrap(self, compute: Compute) -> Compute:
        async def prioritised(fn, *args):  # noqa: ANN001, ANN202 - same shape as compute
            self.active += 1
            if self.active == 1:
                self._idle = trio.Event()
            try:
                return await compute(fn, *args)
            finally:
                self.active -= 1
                if self.active == 0:
                    self._idle.set()

        return prioritised

    async def wait_idle(self) -> None:
        while self.active:
            await self._idle.wait()


def budget_pause(compute_seconds: float, share: float) -> float:
    """Seconds to rest after `compute_seconds` of audit compute so audits take at most
    `share` of the time: compute / (compute + pause) = share."""
    if not 0 < share <= 1:
        raise AuditQueueError("the audit compute share must lie in (0, 1]")
    return max(0.0, compute_seconds) * (1.0 - share) / share
