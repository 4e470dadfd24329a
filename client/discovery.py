"""Bounded, span-indexed discovery: which servers a client contacts in one refresh.

A refresh asks a few peers (its initial peers and some servers it already uses) for
pages of announcements covering the blocks that still lack candidates, narrowest need
first, until every block has `per_block` candidates or the peers have nothing more.
It then contacts (dials, info, RTT) only enough of them to cover each block
`per_block` times: servers it already uses first, then servers its trusted verifiers
call established, then random ones, in rounds that replace the ones that did not answer.
Every step is capped (peers asked, pages per peer, seconds, contacts), so the cost of
a refresh does not grow with the swarm, and a peer that answers garbage, pages forever,
repeats itself or lists only Sybils costs at most its own page budget.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError

from trustswarm.protocol.announcement import MAX_BLOCKS, Announcement, SignedAnnouncement
from trustswarm.protocol.discovery import MAX_QUERY_PEERS, DiscoveryQuery, call_discover
from trustswarm.protocol.limits import DISCOVERY_LIMITS

log = logging.getLogger("trustswarm.client")


@dataclass(frozen=True)
class DiscoveryBounds:
    per_block: int = 12  # candidates wanted (and servers contacted) per block
    explore: int = 2  # random extra contacts per refresh, so new servers get measured
    max_contacts: int = 48  # servers dialled for info per refresh, over all rounds
    contact_rounds: int = 3
    ask_peers: int = 6  # peers asked for pages per refresh
    pages_per_peer: int = 6
    page_timeout: float = 5.0  # one page request, dial excluded
    paging_seconds: float = 15.0  # the whole paging phase
    concurrency: int = 16  # info calls in flight
    max_view: int = 96  # servers kept in the view (and re-checked each refresh)

    def __post_init__(self) -> None:
        for name in ("per_block", "max_contacts", "contact_rounds", "ask_peers", "max_view"):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= 10_000:
                raise ValueError(f"{name} must be an integer in [1, 10000], got {value!r}")
        for name in ("explore", "pages_per_peer"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 10_000:
                raise ValueError(f"{name} must be an integer in [0, 10000], got {value!r}")
        for name in ("page_timeout", "paging_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 3600:
                raise ValueError(f"{name} must be a number of seconds in (0, 3600]")
        if type(self.concurrency) is not int or self.concurrency < 1:
            raise ValueError("concurrency must be a positive integer")


@dataclass
class DiscoveryStats:
    """What one refresh's discovery cost and found (for tests, benchmarks and logs)."""

    peers_asked: int = 0
    pages: int = 0
    page_bytes: int = 0
    records: int = 0  # accepted (valid, ours) announcements received in pages
    bad_records: int = 0  # records that did not decode or were not for our model
    failed_peers: int = 0  # peers whose page request failed (refused, garbage, timeout)
    rechecked: int = 0  # servers already in use and peers asked, dialled for info
    contacted: int = 0  # new servers dialled for info (at most max_contacts)
    answered: int = 0  # of the new ones
    dropped: int = 0  # servers the view let go of (beyond max_view)
    seconds: float = 0.0

    @property
    def dialled(self) -> int:
        return self.rechecked + self.contacted


@dataclass
class Directory:
    """Announcements learned in one refresh, by peer id (bounded by the page budget),
    with the peers that named each."""

    num_blocks: int
    records: dict[str, Announcement] = field(default_factory=dict)
    sources: dict[str, set[str]] = field(default_factory=dict)

    def add(self, ann: Announcement, source: str = "") -> bool:
        """Keep the newest announcement per server; True when `source` had not named
        this server before (a peer that repeats itself brings nothing new)."""
        named = self.sources.setdefault(ann.peer_id, set())
        fresh = source not in named
        named.add(source)
        current = self.records.get(ann.peer_id)
        if current is None or current.issued_at < ann.issued_at:
            self.records[ann.peer_id] = ann
        return fresh

    def counts(self, source: str | None = None, min_sources: int = 1) -> list[int]:
        """Candidates per block: all, only those `source` named, or only those at least
        `min_sources` peers named."""
        counts = [0] * self.num_blocks
        for peer, ann in self.records.items():
            named = self.sources.get(peer, set())
            if (source is not None and source not in named) or len(named) < min_sources:
                continue
            for block in range(ann.start, min(ann.end, self.num_blocks)):
                counts[block] += 1
        return counts

    def ordered(
        self, first: Callable[[str], bool], rng: random.Random | None = None
    ) -> list[Announcement]:
        """Candidates in the order to contact them: those `first` prefers (established
        by our verifiers), then those several peers named, then one from each peer in
        turn, in random order within each. A peer that lists only Sybils (validly
        signed, unreachable) so gets a fair share of the contacts, not all of them."""
        rng = rng or random.Random()
        peers = list(self.records)
        rng.shuffle(peers)
        preferred = [p for p in peers if first(p)]
        corroborated = [p for p in peers if not first(p) and len(self.sources[p]) > 1]
        by_source: dict[str, list[str]] = {}
        for p in peers:
            if not first(p) and len(self.sources[p]) == 1:
                by_source.setdefault(next(iter(self.sources[p])), []).append(p)
        turns = [p for group in _interleave(list(by_source.values())) for p in group]
        return [self.records[p] for p in preferred + corroborated + turns]


def _interleave(groups: list[list[str]]) -> list[list[str]]:
    """One item of each group per turn: [[a1, b1], [a2, b2], [a3]]."""
    depth = max((len(g) for g in groups), default=0)
    return [[g[i] for g in groups if i < len(g)] for i in range(depth)]


def needy_range(
    counts: Sequence[int], want: int, done: set[int] = frozenset()
) -> tuple[int, int] | None:
    """The run of consecutive blocks below `want` candidates (skipping `done` blocks)
    whose worst block has the fewest; None when no block needs more."""
    best: tuple[int, int] | None = None
    best_low = want
    block = 0
    while block < len(counts):
        if counts[block] >= want or block in done:
            block += 1
            continue
        run_start, low = block, counts[block]
        while block < len(counts) and counts[block] < want and block not in done:
            low = min(low, counts[block])
            block += 1
        if low < best_low:
            best, best_low = (run_start, block), low
    return best


def select_contacts(
    candidates: Iterable[Announcement],
    have: Sequence[int],
    want: int,
    limit: int,
    explore: int = 0,
    rng: random.Random | None = None,
) -> list[Announcement]:
    """Candidates (in order of preference) that bring some block below `want` servers;
    `have` counts the servers per block already answering. At most `limit`, of which
    `explore` are random picks among the rest."""
    counts = list(have)
    chosen, rest = [], []
    for ann in candidates:
        if len(chosen) >= limit:
            break
        blocks = range(ann.start, min(ann.end, len(counts)))
        if any(counts[b] < want for b in blocks):
            chosen.append(ann)
            for b in blocks:
                counts[b] += 1
        else:
            rest.append(ann)
    room = min(explore, limit - len(chosen), len(rest))
    if room > 0:
        chosen.extend((rng or random).sample(rest, room))
    return chosen


def model_blocks(span_digest: Callable[[int, int], str] | None, seen: Iterable[int]) -> int:
    """How many blocks the model has: from the manifest when there is one (the largest
    n for which a one-block digest exists), else the furthest block announced."""
    if span_digest is None:
        return max(seen, default=0)
    low, high = 0, MAX_BLOCKS  # block low exists (or low == 0); block high does not
    while high - low > 1:
        mid = (low + high) // 2
        try:
            span_digest(mid, mid + 1)
            low = mid
        except Exception:
            high = mid
    try:
        span_digest(0, 1)
    except Exception:
        return 0
    return low + 1


@dataclass
class Pager:
    """The paging phase of one refresh."""

    host: IHost
    directory: Directory
    accept: Callable[[SignedAnnouncement], Announcement | None]
    bounds: DiscoveryBounds
    stats: DiscoveryStats = field(default_factory=DiscoveryStats)
    no_discover: set[str] = field(default_factory=set)  # peers that refused the RPC
    _scope: trio.CancelScope | None = None

    async def ask_all(self, peers: Sequence[ID], wanted: Sequence[str] = ()) -> None:
        """Ask each peer (in parallel, each within its own page budget) until the
        directory covers every block or the bounds are spent. Once every block has
        `per_block` candidates, pages still in flight (a slow peer's) are abandoned."""
        with trio.move_on_after(self.bounds.paging_seconds) as self._scope:
            async with trio.open_nursery() as nursery:
                for peer in peers[: self.bounds.ask_peers]:
                    self.stats.peers_asked += 1
                    nursery.start_soon(self._ask_peer, peer, tuple(wanted))
        self._scope = None

    def _enough(self) -> bool:
        """Every block has `per_block` candidates that two peers named: one peer's
        Sybils alone never end the others' paging."""
        counts = self.directory.counts(min_sources=2)
        return needy_range(counts, self.bounds.per_block) is None

    async def _page(self, peer: ID, query: DiscoveryQuery) -> tuple[int, str] | None:
        """One page: (servers it named for the first time, next cursor); None when the
        peer failed."""
        try:
            page, size = await call_discover(
                self.host, peer, query, self.bounds.page_timeout, DISCOVERY_LIMITS
            )
        except Exception as exc:
            self.stats.failed_peers += 1
            if refused_protocol(exc):
                self.no_discover.add(str(peer))
            log.debug("peer %s gave no discover page: %s", peer, exc)
            return None
        self.stats.pages += 1
        self.stats.page_bytes += size
        signed, bad = page.announcements()
        self.stats.bad_records += bad
        new = 0
        for record in signed:
            ann = self.accept(record)
            if ann is None:
                self.stats.bad_records += 1
                continue
            self.stats.records += 1
            new += self.directory.add(ann, str(peer))
        if self._scope is not None and self._enough():
            self._scope.cancel()
        return new, page.next_cursor

    async def _ask_peer(self, peer: ID, wanted: tuple[str, ...]) -> None:
        budget = self.bounds.pages_per_peer
        if wanted and budget:  # servers our verifiers call established, by peer id
            budget -= 1
            query = DiscoveryQuery(0, self.directory.num_blocks, peers=wanted[:MAX_QUERY_PEERS])
            if await self._page(peer, query) is None:
                return
        done: set[int] = set()  # blocks this peer has nothing more for
        cursors: dict[tuple[int, int], str] = {}
        for _ in range(budget):
            # What this peer named so far: another peer's Sybils do not stop this one.
            counts = self.directory.counts(source=str(peer))
            span = needy_range(counts, self.bounds.per_block, done)
            if span is None:
                return
            result = await self._page(peer, DiscoveryQuery(*span, cursor=cursors.get(span, "")))
            if result is None:
                return
            new, cursor = result
            if not cursor:
                done.update(range(*span))
            elif new == 0:  # only what we already hold: a peer repeating itself is done
                return
            cursors[span] = cursor


def refused_protocol(exc: BaseException) -> bool:
    """The peer does not speak the protocol (py-libp2p wraps multistream's refusal)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, MultiselectClientError) or "not supported" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def contact_in_rounds(
    candidates: Sequence[Announcement],
    answering: Callable[[], list[Announcement]],
    num_blocks: int,
    bounds: DiscoveryBounds,
    contact: Callable[[Announcement], Awaitable[bool]],
    stats: DiscoveryStats,
    rng: random.Random | None = None,
) -> None:
    """Contact candidates for the blocks that lack answering servers, in rounds (the
    next round replaces the candidates that did not answer), at most max_contacts."""
    tried: set[str] = {ann.peer_id for ann in answering()}
    limiter = trio.CapacityLimiter(bounds.concurrency)

    async def one(ann: Announcement) -> None:
        async with limiter:
            answered = await contact(ann)  # not `+= await`: that reads before waiting
            stats.answered += answered

    for round_number in range(bounds.contact_rounds):
        have = [0] * num_blocks
        for ann in answering():
            for block in range(ann.start, min(ann.end, num_blocks)):
                have[block] += 1
        room = bounds.max_contacts - stats.contacted
        explore = bounds.explore if round_number == 0 else 0
        fresh = [ann for ann in candidates if ann.peer_id not in tried]
        picks = select_contacts(fresh, have, bounds.per_block, room, explore, rng)
        if not picks:
            return
        stats.contacted += len(picks)
        tried.update(ann.peer_id for ann in picks)
        async with trio.open_nursery() as nursery:
            for ann in picks:
                nursery.start_soon(one, ann)
