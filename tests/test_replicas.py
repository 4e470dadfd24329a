"""Replica choice and vote rules: pure functions, property-tested."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from trustswarm.client.agreement import decide
from trustswarm.client.replicas import host_of, hosts_of, pick, quorum, segments
from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.errors import SwarmError

BLOCKS = 12


def _server(i: int, start: int, end: int, host: int, throughput: float = 100.0) -> Announcement:
    return Announcement(
        peer_id=f"peer{i}",
        model_id="m",
        start=start,
        end=end,
        weights_digest="d",
        dtype="float32",
        throughput=throughput,
        addrs=(f"/ip4/10.0.{host}.1/tcp/{4000 + i}",),  # one /24 network per host
        issued_at=0.0,
        expires_at=1e12,
    )


@st.composite
def swarms(draw: st.DrawFn) -> list[Announcement]:
    n = draw(st.integers(1, 10))
    servers = []
    for i in range(n):
        start = draw(st.integers(0, BLOCKS - 1))
        end = draw(st.integers(start + 1, BLOCKS))
        host = draw(st.integers(1, 4))
        throughput = draw(st.floats(1.0, 1e4))
        servers.append(_server(i, start, end, host, throughput))
    return servers


@given(swarms(), st.integers(1, 4))
def test_segments_tile_the_span_and_each_has_k_servers(servers, k):
    try:
        cuts = segments(servers, 0, BLOCKS, k)
    except SwarmError as exc:
        assert "distinct servers for block" in str(exc)
        # Some block really has fewer than k servers covering it.
        assert any(sum(s.covers(b) for s in servers) < k for b in range(BLOCKS))
        return
    assert cuts[0][0] == 0 and cuts[-1][1] == BLOCKS
    assert all(a < b for a, b in cuts)
    assert all(cuts[i][1] == cuts[i + 1][0] for i in range(len(cuts) - 1))
    for a, b in cuts:
        assert sum(s.start <= a and b <= s.end for s in servers) >= k


@given(swarms(), st.integers(1, 5), st.data())
def test_pick_gives_distinct_covering_servers_on_distinct_hosts_first(servers, count, data):
    start = data.draw(st.integers(0, BLOCKS - 1))
    end = data.draw(st.integers(start + 1, BLOCKS))
    chosen = pick(servers, start, end, count)
    covering = [s for s in servers if s.start <= start and end <= s.end]
    assert len(chosen) == min(count, len(covering))
    assert len({s.peer_id for s in chosen}) == len(chosen)
    assert all(s in covering for s in chosen)
    distinct_hosts = len({h for s in covering for h in hosts_of(s)})
    used = [hosts_of(s) for s in chosen]
    # A host is used twice only when every covering host is already in use.
    if len(chosen) <= distinct_hosts:
        assert len({next(iter(h)) for h in used}) == len(chosen)


def test_pick_excludes_and_avoids_hosts():
    servers = [_server(0, 0, 4, 1, 1e4), _server(1, 0, 4, 1), _server(2, 0, 4, 2, 1.0)]
    assert [s.peer_id for s in pick(servers, 0, 4, 2)] == ["peer0", "peer2"]
    assert [s.peer_id for s in pick(servers, 0, 4, 1, exclude={"peer0"})] == ["peer1"]
    assert [s.peer_id for s in pick(servers, 0, 4, 1, avoid_hosts={"10.0.1.0/24"})] == ["peer2"]


def test_replicas_count_the_network_a_connection_came_from_not_announced_addresses():
    """One host announcing many "distinct" addresses: once the client has seen where the
    connections come from, its identities count as one network."""
    liars = [_server(i, 0, 4, host=i + 1, throughput=1e4) for i in range(3)]
    other = _server(9, 0, 4, host=50, throughput=1.0)
    observed = {s.peer_id: "198.18.7.20" for s in liars} | {other.peer_id: "198.19.0.3"}
    assert len({h for s in liars for h in hosts_of(s)}) == 3  # what they announce
    chosen = pick([*liars, other], 0, 4, 2, observed=observed)
    assert [s.peer_id for s in chosen] == ["peer0", "peer9"]
    assert hosts_of(liars[1], {"peer1": "198.18.7.99"}) == {"198.18.7.0/24"}
    assert hosts_of(liars[1], {"peer1": "2001:db8:1:2::5"}) == {"2001:db8:1:2::/64"}


def test_host_of_multiaddrs():
    assert host_of("/ip4/1.2.3.4/tcp/5") == "1.2.3.4"
    assert host_of("/dns4/example.org/tcp/5") == "example.org"
    assert host_of("garbage") == "garbage"


def test_quorum_is_a_strict_majority():
    assert [quorum(k) for k in range(1, 7)] == [1, 2, 2, 3, 3, 4]


def _outputs(labels: list[int]) -> list[torch.Tensor]:
    base = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(0))
    return [base * (1.0 + 0.5 * label) for label in labels]


@given(st.lists(st.integers(0, 3), min_size=1, max_size=7), st.integers(1, 5))
def test_decide_picks_a_strict_quorum_or_nothing(labels, k):
    decision = decide(_outputs(labels), k, "hidden")
    # Outputs with the same label are identical, different labels differ by >= 50%.
    assert len(set(decision.clusters)) == len(set(labels))
    sizes = {c: decision.clusters.count(c) for c in set(decision.clusters)}
    if decision.winner is None:
        best = max(sizes.values())
        assert best < quorum(k) or list(sizes.values()).count(best) > 1
    else:
        size = sizes[decision.winner]
        assert size >= quorum(k)
        assert all(v < size for c, v in sizes.items() if c != decision.winner)


def test_decide_rejects_nan_answers_as_their_own_cluster():
    good = _outputs([0, 0])
    bad = torch.full_like(good[0], float("nan"))
    decision = decide([good[0], bad, good[1]], 3, "hidden")
    assert decision.winner == 0 and decision.clusters == [0, 1, 0]


@pytest.mark.parametrize("k", [0, -2])
def test_segments_refuse_bad_k(k):
    with pytest.raises(SwarmError):
        segments([_server(0, 0, 4, 1)], 0, 4, k)
