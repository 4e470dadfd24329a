"""Route choice over announced servers: pure functions, no networking."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from trustswarm.protocol.announcement import MAX_THROUGHPUT, Announcement
from trustswarm.protocol.errors import SwarmError

DEFAULT_RTT = 0.05  # seconds, for servers we have not measured yet
HOP_OVERHEAD = 0.002  # seconds of framing, signing and checking per hop


@dataclass(frozen=True)
class Hop:
    server: Announcement
    start: int
    end: int


def seconds_per_token(ann: Announcement, start: int, end: int) -> float:
    span_blocks = max(1, ann.end - ann.start)
    throughput = ann.throughput if ann.throughput > 0 else 1.0
    return (end - start) / span_blocks / throughput


def latency_route(
    servers: list[Announcement],
    start: int,
    end: int,
    rtts: dict[str, float] | None = None,
    penalties: dict[str, float] | None = None,
) -> list[Hop]:
    """Cheapest chain of hops covering blocks [start, end) for one decoding step.

    Cost of a hop = measured RTT + compute time of its blocks + fixed overhead
    + the server's penalty (seconds, >= 0: reputation, see client/trust.py);
    dynamic programming over block boundaries (exact, tiny for real block counts).
    """
    rtts = rtts or {}
    penalties = penalties or {}
    best: dict[int, tuple[float, list[Hop]]] = {start: (0.0, [])}
    for a in range(start, end):
        if a not in best:
            continue
        cost_a, hops_a = best[a]
        for ann in servers:
            if not ann.start <= a < ann.end:
                continue
            # A hop may stop before the server's end: a faster server may take over.
            for b in range(a + 1, min(ann.end, end) + 1):
                cost = (
                    cost_a
                    + rtts.get(ann.peer_id, DEFAULT_RTT)
                    + HOP_OVERHEAD
                    + penalties.get(ann.peer_id, 0.0)
                    + seconds_per_token(ann, a, b)
                )
                if b not in best or cost < best[b][0]:
                    best[b] = (cost, [*hops_a, Hop(ann, a, b)])
    if end not in best:
        raise SwarmError(
            f"no available servers cover blocks {start}:{end}: {missing(servers, start, end)}"
        )
    return best[end][1]


def throughput_route(
    servers: list[Announcement],
    start: int,
    end: int,
    rng: random.Random | None = None,
    weights: dict[str, float] | None = None,
) -> list[Hop]:
    """A route for a forward pass: at each block pick a server at random, weighted by
    throughput (times its factor in `weights`, e.g. reputation), and let it run as far
    as it covers (spreads load across servers)."""
    rng = rng or random.Random()
    factors = weights or {}
    hops: list[Hop] = []
    a = start
    while a < end:
        candidates = [s for s in servers if s.start <= a < s.end]
        if not candidates:
            raise SwarmError(
                f"no available servers cover blocks {start}:{end}: {missing(servers, start, end)}"
            )
        shares = [pick_weight(s.throughput, factors.get(s.peer_id, 1.0)) for s in candidates]
        ann = rng.choices(candidates, weights=shares)[0]
        b = min(ann.end, end)
        hops.append(Hop(ann, a, b))
        a = b
    return hops


def pick_weight(throughput: float, factor: float) -> float:
    """A server's share of random picks: its throughput (at most MAX_THROUGHPUT) times its
    factor; never NaN, infinite or zero, so the total is always a valid weight sum."""
    share = min(max(throughput, 1e-3), MAX_THROUGHPUT) * factor
    return share if math.isfinite(share) and share > 1e-9 else 1e-9


def missing(servers: list[Announcement], start: int, end: int) -> str:
    uncovered = [b for b in range(start, end) if not any(s.covers(b) for s in servers)]
    return f"blocks {uncovered} have no server" if uncovered else "route not found"
