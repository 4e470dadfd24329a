"""One refresh of a client's swarm view by bounded discovery (client/discovery.py).

1. Re-check the servers the view already holds (info: RTT, load, their fresh
   announcement) and the peers we ask; what does not answer leaves the view.
2. Ask a few peers (initial peers first, then servers in use) for pages of the
   announcements covering the blocks that still lack candidates. Each record is checked
   as every other announcement is (SwarmView.acceptable: signature, expiry, our model,
   our manifest's weights digest, a signing dtype) before it counts.
3. Contact (dial + info) only enough of the candidates to cover each block `per_block`
   times, established servers first, in a few rounds.

A peer that does not speak /discover is remembered; when no peer asked does, the caller
falls back to reading the DHT and asking every known server (SwarmClient._refresh_all).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import multiaddr
import trio

from trustswarm.protocol.announcement import MAX_ID_CHARS, Announcement, providers_key
from trustswarm.protocol.identity import parse_peer_id
from trustswarm.reputation.score import OK

from .discovery import (
    Directory,
    DiscoveryBounds,
    DiscoveryStats,
    Pager,
    contact_in_rounds,
    model_blocks,
    select_contacts,
)

if TYPE_CHECKING:
    from .swarm import SwarmClient, SwarmView

log = logging.getLogger("trustswarm.client")


def _askers(client: SwarmClient, bounds: DiscoveryBounds, rng: random.Random) -> list[str]:
    """Peers to ask for pages: initial peers, then servers in use, minus those that
    refused the RPC before; at most `ask_peers`."""
    initial = [str(info.peer_id) for info in client.initial_peers]
    in_use = [p for p in client.view.servers if p not in initial]
    rng.shuffle(in_use)
    chosen = [p for p in dict.fromkeys(initial + in_use) if p not in client.no_discover]
    return chosen[: bounds.ask_peers]


def _established(client: SwarmClient) -> list[str]:
    """Servers our trusted verifiers call ok (asked for by peer id)."""
    trust = client.view.trust
    if trust is None:
        return []
    wall = time.time()
    subjects = {s for _, s in trust.records if isinstance(s, str) and 0 < len(s) <= MAX_ID_CHARS}
    return sorted(s for s in subjects if trust.state(s, wall) == OK)


@dataclass
class _Refresh:
    """The state of one refresh by discovery: what answered, what did not, where."""

    client: SwarmClient
    bounds: DiscoveryBounds
    directory: Directory
    answered: set[str] = field(default_factory=set)
    unreachable: set[str] = field(default_factory=set)
    addrs: dict[str, list[multiaddr.Multiaddr]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.limiter = trio.CapacityLimiter(self.bounds.concurrency)
        self.addrs.update({str(i.peer_id): list(i.addrs) for i in self.client.initial_peers})

    async def check(self, peer: str) -> bool:
        """Info from `peer`; its own announcement (and its info sample) as candidates."""
        view = self.client.view
        known = view.servers.get(peer)
        async with self.limiter:
            info = await self.client.contact(
                peer, self.addrs.get(peer) or (parse_addrs(known.addrs) if known else [])
            )
        if info is None:
            self.unreachable.add(peer)
            return False
        self.answered.add(peer)
        if peer in view.servers:
            self.directory.add(view.servers[peer], peer)
        for other in info.known:  # a random sample: more candidates, not more contacts
            accepted = view.acceptable(other)
            if accepted is not None:
                self.directory.add(accepted, peer)
        return True

    async def recheck(self, peers: Sequence[str]) -> None:
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(self.check, peer)

    async def contact(self, ann: Announcement) -> bool:
        return True if ann.peer_id in self.answered else await self.check(ann.peer_id)

    async def contact_candidates(self, stats: DiscoveryStats, rng: random.Random) -> None:
        """Contact enough of the directory's candidates, established ones first."""
        view = self.client.view
        for ann in self.directory.records.values():
            self.addrs.setdefault(ann.peer_id, parse_addrs(ann.addrs))
        trust = view.trust
        candidates = self.directory.ordered(
            lambda p: trust is not None and trust.state(p) == OK, rng
        )
        await contact_in_rounds(
            [a for a in candidates if a.peer_id not in self.answered],
            lambda: [view.servers[p] for p in self.answered if p in view.servers],
            self.directory.num_blocks,
            self.bounds,
            self.contact,
            stats,
            rng,
        )


async def refresh_by_discovery(
    client: SwarmClient, bounds: DiscoveryBounds, rng: random.Random | None = None
) -> DiscoveryStats | None:
    """Refresh `client.view` by discovery; its stats, or None when no peer we could ask
    speaks /discover (the view is then left to the caller's fallback)."""
    rng = rng or random.Random()
    view = client.view
    num_blocks = model_blocks(view.span_digest, (a.end for a in view.servers.values()))
    askers = _askers(client, bounds, rng)
    if num_blocks == 0 or not askers:
        return None
    began = time.monotonic()
    state = _Refresh(client, bounds, Directory(num_blocks))
    pager = Pager(client.host, state.directory, view.acceptable, bounds)
    stats = pager.stats
    recheck = list(dict.fromkeys([*askers, *view.servers]))
    await state.recheck(recheck)
    stats.rechecked = len(recheck)
    await pager.ask_all([parse_peer_id(p) for p in askers], _established(client))
    client.no_discover |= pager.no_discover
    if stats.pages == 0 and stats.failed_peers:  # nobody we asked answers discover
        return None
    for peer in state.unreachable:  # re-checked, gone: out until it answers again
        view.servers.pop(peer, None)
    await state.contact_candidates(stats, rng)
    stats.dropped = prune_view(view, bounds, num_blocks)
    stats.seconds = time.monotonic() - began
    return stats


def prune_view(view: SwarmView, bounds: DiscoveryBounds, num_blocks: int) -> int:
    """Keep at most `max_view` servers (each refresh re-checks all it keeps, and every
    refresh may explore new ones): first enough to cover each block `per_block` times,
    established and nearest first, then the nearest others. Returns how many it dropped."""
    if len(view.servers) <= bounds.max_view:
        return 0
    trust, wall = view.trust, time.time()

    def preference(ann: Announcement) -> tuple[int, float]:
        established = trust is not None and trust.state(ann.peer_id, wall) == OK
        return (0 if established else 1, view.rtts.get(ann.peer_id, math.inf))

    ordered = sorted(view.servers.values(), key=preference)
    keep = {a.peer_id for a in select_contacts(ordered, [0] * num_blocks, bounds.per_block,
                                                bounds.max_view)}  # fmt: skip
    for ann in ordered:
        if len(keep) >= bounds.max_view:
            break
        keep.add(ann.peer_id)
    dropped = [peer for peer in view.servers if peer not in keep]
    for peer in dropped:
        del view.servers[peer]
    return len(dropped)


async def refresh_all(client: SwarmClient) -> None:
    """The old way (and the fallback): ask every known peer and the DHT's providers
    which servers exist, then every server their info answers named; measure RTTs."""
    view = client.view
    candidates: dict[str, list[multiaddr.Multiaddr]] = {
        str(i.peer_id): list(i.addrs) for i in client.initial_peers
    }
    for ann in view.servers.values():
        candidates.setdefault(ann.peer_id, parse_addrs(ann.addrs))
    if client.dht is not None and client.dht_lookups:
        with trio.move_on_after(client.connect_timeout):
            try:
                for info in await client.dht.find_providers(providers_key(view.model_id)):
                    candidates.setdefault(str(info.peer_id), list(info.addrs))
            except Exception as exc:
                log.debug("DHT provider lookup failed: %s", exc)
    unreachable: set[str] = set()

    async def ask(peer: str, addrs: list[multiaddr.Multiaddr]) -> None:
        info = await client.contact(peer, addrs)
        if info is None:
            unreachable.add(peer)
            return
        for other in info.known:
            view.consider(other)

    async with trio.open_nursery() as nursery:
        for peer, addrs in candidates.items():
            nursery.start_soon(ask, peer, addrs)
    # Announcements learned second-hand whose servers we have not contacted yet.
    fresh = {p: a for p, a in view.servers.items() if p not in candidates}
    async with trio.open_nursery() as nursery:
        for peer, ann in fresh.items():
            nursery.start_soon(ask, peer, parse_addrs(ann.addrs))
    # Other servers' stores still hold the announcements of servers that just
    # died; what we could not reach ourselves stays out until it answers again.
    for peer in unreachable:
        view.servers.pop(peer, None)


def parse_addrs(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    """The parsable ones of announced addresses (announcements are validated on
    decoding; this keeps one odd address from failing a whole refresh regardless)."""
    parsed = []
    for addr in addrs:
        try:
            parsed.append(multiaddr.Multiaddr(addr))
        except Exception:
            log.debug("ignoring unparsable address %r", addr[:80])
    return parsed
