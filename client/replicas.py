"""Choosing the k servers that compute the same span: pure functions, no networking.

With redundancy k the blocks are cut into segments that at least k servers cover
whole, so that all k answer exactly the same request and can be compared. Within a
segment the replicas are distinct identities (the view is keyed by peer id, so one
identity never fills two slots), spread over as many networks as possible
(one host running several identities should not outvote the rest), fastest first.
A server's network is the /24 (IPv4) or /64 (IPv6) prefix of the address its connection
actually came from, as the client observed it; announced addresses count only for
servers the client has not connected to yet (an announcement may list any addresses).
Replicas of one call announce one dtype where enough servers allow it: honest bfloat16
and float32 answers of a deep span can differ beyond any tolerance that still catches a
cheat (DESIGN-NOTES, "Votes compare like with like"), so a mixed vote is the last resort.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping

from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.errors import SwarmError

from .routing import DEFAULT_RTT, HOP_OVERHEAD, seconds_per_token


def quorum(k: int) -> int:
    """Agreeing distinct answers needed to accept a value: a strict majority of k."""
    return k // 2 + 1


def host_of(addr: str) -> str:
    """The network host of a multiaddr (/ip4/1.2.3.4/tcp/1 -> 1.2.3.4), or the addr itself."""
    parts = addr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6"):
        return parts[2]
    return addr


def network_of(host: str) -> str:
    """The /24 of an IPv4 address or the /64 of an IPv6 address; other names as they are."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def hosts_of(ann: Announcement, observed: Mapping[str, str] | None = None) -> frozenset[str]:
    """The networks a server counts as: where its connection came from, when observed."""
    seen = (observed or {}).get(ann.peer_id)
    if seen:
        return frozenset({network_of(seen)})
    return frozenset(network_of(host_of(a)) for a in ann.addrs)


def segments(
    servers: Collection[Announcement], start: int, end: int, k: int
) -> list[tuple[int, int]]:
    """Cut [start, end) into as few segments as possible, each covered whole by >= k servers."""
    if k < 1:
        raise SwarmError("redundancy must be at least 1")
    cuts: list[tuple[int, int]] = []
    block = start
    while block < end:
        ends = sorted((min(s.end, end) for s in servers if s.start <= block < s.end), reverse=True)
        if len(ends) < k:
            raise SwarmError(
                f"redundancy={k} needs {k} distinct servers for block {block}; "
                f"{len(ends)} available"
            )
        stop = ends[k - 1]  # the k-th longest reach: k servers cover [block, stop)
        cuts.append((block, stop))
        block = stop
    return cuts


def pick(
    servers: Collection[Announcement],
    start: int,
    end: int,
    count: int,
    exclude: Collection[str] = (),
    avoid_hosts: Collection[str] = (),
    rtts: dict[str, float] | None = None,
    penalty: Callable[[str], float] | None = None,
    observed: Mapping[str, str] | None = None,
) -> list[Announcement]:
    """Up to `count` servers covering [start, end) whole, none in `exclude`.

    Greedy: the cheapest server (RTT + compute + reputation penalty) on a host not yet
    used; only when every remaining server shares a host with one chosen already does a
    host get a second slot.
    """
    rtts = rtts or {}
    candidates = [
        s for s in servers if s.start <= start and end <= s.end and s.peer_id not in exclude
    ]

    def cost(s: Announcement) -> tuple[float, str]:
        extra = penalty(s.peer_id) if penalty else 0.0
        latency = rtts.get(s.peer_id, DEFAULT_RTT) + HOP_OVERHEAD
        return latency + seconds_per_token(s, start, end) + extra, s.peer_id

    candidates.sort(key=cost)
    chosen: list[Announcement] = []
    used = set(avoid_hosts)
    while candidates and len(chosen) < count:
        fresh = next((s for s in candidates if not hosts_of(s, observed) & used), candidates[0])
        candidates.remove(fresh)
        chosen.append(fresh)
        used |= hosts_of(fresh, observed)
    return chosen


def vote_dtypes(
    servers: Collection[Announcement],
    start: int,
    end: int,
    count: int,
    taken: Collection[str] = (),
) -> list[str]:
    """The announced dtypes, in order of preference, that `count` of `servers` covering
    [start, end) whole share. With answers `taken` already (escalation spares), only
    their dtype, if they share one; otherwise float32 first (the strict tolerance), then
    the dtype most servers announce."""
    taken = set(taken)
    if len(taken) > 1:
        return []
    counts: dict[str, int] = {}
    for s in servers:
        if s.start <= start and end <= s.end:
            counts[s.dtype] = counts.get(s.dtype, 0) + 1
    if taken:
        (only,) = taken
        return [only] if counts.get(only, 0) >= count else []
    enough = [d for d, n in counts.items() if n >= count]
    return sorted(enough, key=lambda d: (d != "float32", -counts[d], d))
