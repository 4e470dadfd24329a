"""Route choice and block selection against brute force."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.client.routing import (
    DEFAULT_RTT,
    HOP_OVERHEAD,
    Hop,
    latency_route,
    throughput_route,
)
from trustswarm.node.selection import coverage, worst_covered_span
from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.errors import SwarmError

SETTINGS = settings(max_examples=150, deadline=None)


def ann(peer: str, start: int, end: int, throughput: float = 10.0) -> Announcement:
    return Announcement(
        peer_id=peer,
        model_id="m",
        start=start,
        end=end,
        weights_digest="0" * 64,
        dtype="float32",
        throughput=throughput,
        addrs=(),
        issued_at=0.0,
        expires_at=1e12,
    )


@st.composite
def swarm_st(draw: st.DrawFn, max_blocks: int = 5, max_servers: int = 4):
    num_blocks = draw(st.integers(1, max_blocks))
    servers = []
    for i in range(draw(st.integers(0, max_servers))):
        start = draw(st.integers(0, num_blocks - 1))
        end = draw(st.integers(start + 1, num_blocks))
        throughput = draw(st.sampled_from([0.0, -1.0]) | st.floats(0.01, 1000.0))
        servers.append(ann(f"p{i}", start, end, throughput))
    start = draw(st.integers(0, num_blocks - 1))
    end = draw(st.integers(start + 1, num_blocks))
    rtts = draw(
        st.dictionaries(
            st.sampled_from([s.peer_id for s in servers] or ["none"]),
            st.floats(0.0, 0.3),
            max_size=len(servers),
        )
    )
    return servers, start, end, rtts


def hop_cost(hop: Hop, rtts: dict[str, float]) -> float:
    s = hop.server
    throughput = s.throughput if s.throughput > 0 else 1.0
    compute = (hop.end - hop.start) / max(1, s.end - s.start) / throughput
    return rtts.get(s.peer_id, DEFAULT_RTT) + HOP_OVERHEAD + compute


def route_cost(route: list[Hop], rtts: dict[str, float]) -> float:
    return sum(hop_cost(h, rtts) for h in route)


def all_routes(servers: list[Announcement], a: int, end: int) -> Iterator[list[Hop]]:
    """Every chain of hops over [a, end): each hop any sub-span of one server's span."""
    if a == end:
        yield []
        return
    for s in servers:
        if not s.start <= a < s.end:
            continue
        for b in range(a + 1, min(s.end, end) + 1):
            for rest in all_routes(servers, b, end):
                yield [Hop(s, a, b), *rest]


def covered(servers: list[Announcement], start: int, end: int) -> bool:
    return all(any(s.start <= b < s.end for s in servers) for b in range(start, end))


def assert_exact_cover(route: list[Hop], start: int, end: int) -> None:
    assert route, "an empty route for a non-empty span"
    assert route[0].start == start
    assert route[-1].end == end
    for prev, nxt in zip(route, route[1:], strict=False):
        assert prev.end == nxt.start
    for hop in route:
        assert hop.start < hop.end
        assert hop.server.start <= hop.start and hop.end <= hop.server.end


# --------------------------------------------------------------------------- latency_route


@SETTINGS
@given(case=swarm_st())
def test_latency_route_is_exact_and_optimal(case) -> None:
    servers, start, end, rtts = case
    if not covered(servers, start, end):
        with pytest.raises(SwarmError):
            latency_route(servers, start, end, rtts)
        return
    route = latency_route(servers, start, end, rtts)
    assert_exact_cover(route, start, end)
    best = min(route_cost(r, rtts) for r in all_routes(servers, start, end))
    assert route_cost(route, rtts) <= best + 1e-9


def test_latency_route_hands_over_to_a_faster_server() -> None:
    slow, fast = ann("slow", 0, 10, 0.01), ann("fast", 5, 10, 1000.0)
    route = latency_route([slow, fast], 0, 10)
    assert [(h.server.peer_id, h.start, h.end) for h in route] == [("slow", 0, 5), ("fast", 5, 10)]


def test_latency_route_prefers_one_hop_when_equal() -> None:
    a, b = ann("a", 0, 4), ann("b", 0, 2)
    route = latency_route([a, b], 0, 4)
    assert [(h.server.peer_id, h.start, h.end) for h in route] == [("a", 0, 4)]


def test_latency_route_uses_measured_rtts() -> None:
    a, b = ann("a", 0, 4), ann("b", 0, 4)
    assert latency_route([a, b], 0, 4, {"a": 0.5, "b": 0.01})[0].server.peer_id == "b"
    assert latency_route([a, b], 0, 4, {"a": 0.01, "b": 0.5})[0].server.peer_id == "a"


@pytest.mark.parametrize(
    ("servers", "start", "end", "hole"),
    [
        ([], 0, 3, "[0, 1, 2]"),
        ([ann("a", 0, 2), ann("b", 3, 5)], 0, 5, "[2]"),
        ([ann("a", 1, 5)], 0, 5, "[0]"),
        ([ann("a", 0, 4)], 0, 5, "[4]"),
    ],
)
def test_routes_fail_on_uncovered_block(servers, start, end, hole) -> None:
    with pytest.raises(SwarmError, match=hole.replace("[", r"\[").replace("]", r"\]")):
        latency_route(servers, start, end)
    with pytest.raises(SwarmError):
        throughput_route(servers, start, end, random.Random(0))


def test_sub_span_of_the_model() -> None:
    servers = [ann("a", 0, 10), ann("b", 4, 6, 1000.0)]
    route = latency_route(servers, 3, 7)
    assert_exact_cover(route, 3, 7)
    assert_exact_cover(throughput_route(servers, 3, 7, random.Random(1)), 3, 7)
    assert latency_route(servers, 3, 3) == []


# --------------------------------------------------------------------------- throughput_route


@SETTINGS
@given(case=swarm_st(max_blocks=12, max_servers=8), seed=st.integers(0, 2**32))
def test_throughput_route_covers_exactly(case, seed: int) -> None:
    servers, start, end, _ = case
    if not covered(servers, start, end):
        with pytest.raises(SwarmError):
            throughput_route(servers, start, end, random.Random(seed))
        return
    route = throughput_route(servers, start, end, random.Random(seed))
    assert_exact_cover(route, start, end)
    # Each hop runs as far as its server covers (or to the end of the span).
    for hop in route:
        assert hop.end == min(hop.server.end, end)


def test_throughput_route_spreads_by_throughput() -> None:
    servers = [ann("fast", 0, 4, 90.0), ann("slow", 0, 4, 10.0)]
    rng = random.Random(1234)
    picks = [throughput_route(servers, 0, 4, rng)[0].server.peer_id for _ in range(2000)]
    share = picks.count("fast") / len(picks)
    assert 0.85 < share < 0.95


# --------------------------------------------------------------------------- block selection


@SETTINGS
@given(
    cover=st.lists(st.floats(0, 100, allow_subnormal=False), min_size=1, max_size=20),
    length=st.integers(-2, 25),
)
def test_worst_covered_span_matches_brute_force(cover: list[float], length: int) -> None:
    start, end = worst_covered_span(cover, length)
    n = max(1, min(length, len(cover)))
    assert end - start == n
    assert 0 <= start and end <= len(cover)
    best = min(sum(cover[s : s + n]) for s in range(len(cover) - n + 1))
    assert sum(cover[start:end]) <= best + 1e-9


@SETTINGS
@given(case=swarm_st(max_blocks=12, max_servers=6), length=st.integers(1, 12))
def test_coverage_and_selection_against_brute_force(case, length: int) -> None:
    servers, _, _, _ = case
    num_blocks = max([s.end for s in servers] + [length])
    cover = coverage(servers, num_blocks)
    assert len(cover) == num_blocks
    for b in range(num_blocks):
        want = sum(max(s.throughput, 1e-3) for s in servers if s.start <= b < s.end)
        assert cover[b] == pytest.approx(want)
    start, end = worst_covered_span(cover, length)
    totals = {s: sum(cover[s : s + length]) for s in range(num_blocks - length + 1)}
    assert end == start + length
    assert totals[start] <= min(totals.values()) + 1e-9


def test_selection_picks_the_hole() -> None:
    servers = [ann("a", 0, 4, 50.0), ann("b", 8, 12, 50.0), ann("c", 4, 6, 1.0)]
    assert worst_covered_span(coverage(servers, 12), 2) == (6, 8)
    assert worst_covered_span(coverage(servers, 12), 4) == (4, 8)
    assert worst_covered_span(coverage([], 5), 3) == (0, 3)  # ties: the first window


def test_coverage_clips_spans_past_the_model() -> None:
    cover = coverage([ann("a", 2, 50, 5.0)], 4)
    assert cover == [0.0, 0.0, 5.0, 5.0]


@SETTINGS
@given(
    throughputs=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=6),
    factors=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_throughput_route_survives_hostile_numbers(throughputs, factors, seed) -> None:
    """NaN, infinite, huge or negative throughputs and factors (an announcement built
    in code, or a reputation factor) never make random.choices raise."""
    servers = [ann(f"p{i}", 0, 4, t) for i, t in enumerate(throughputs)]
    weights = {f"p{i}": f for i, f in enumerate(factors)}
    hops = throughput_route(servers, 0, 4, random.Random(seed), weights)
    assert hops and hops[0].start == 0 and hops[-1].end == 4
