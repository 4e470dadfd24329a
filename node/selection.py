"""Petals-style block selection: serve the span the swarm covers worst."""

from __future__ import annotations

from trustswarm.protocol.announcement import Announcement


def coverage(servers: list[Announcement], num_blocks: int) -> list[float]:
    """Throughput per block summed over servers (used to pick the worst-covered span)."""
    cover = [0.0] * num_blocks
    for s in servers:
        for b in range(max(0, s.start), min(num_blocks, s.end)):
            cover[b] += max(s.throughput, 1e-3)
    return cover


def worst_covered_span(cover: list[float], length: int) -> tuple[int, int]:
    """Petals-style block selection: the window of `length` blocks with least coverage."""
    length = max(1, min(length, len(cover)))
    best_start, best_total = 0, float("inf")
    for s in range(0, len(cover) - length + 1):
        total = sum(cover[s : s + length])
        if total < best_total - 1e-12:
            best_start, best_total = s, total
    return best_start, best_start + length
