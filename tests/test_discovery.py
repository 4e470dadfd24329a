"""The discover RPC (issue 12): paged, seeded-random, bounded discovery.

Properties of the wire parsing (queries, cursors, pages: malformed, huge, NaN,
negative), of the server's paging (every matching record exactly once, in pages that
fit, in an order nobody can buy) and of the client's selection; then real nodes on
loopback: a client finds every server through pages, contacts only what it needs,
falls back when peers do not speak /discover, and hostile discover servers (forged,
expired, wrong-model, duplicate, oversized, stalling, Sybil records) get nothing
accepted and do not keep it from the honest servers.
"""

from __future__ import annotations

import json
import random
import time
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustswarm.client.discovery import (
    Directory,
    DiscoveryBounds,
    Pager,
    needy_range,
    select_contacts,
)
from trustswarm.client.refresh import prune_view
from trustswarm.client.swarm import SwarmClient, SwarmView
from trustswarm.node.peers import answer_query, parse_cursor
from trustswarm.protocol.announcement import (
    Announcement,
    SignedAnnouncement,
    announcement_key,
    sign_announcement,
)
from trustswarm.protocol.codec import Message, encode_message
from trustswarm.protocol.discovery import (
    DISCOVER,
    DiscoveryPage,
    DiscoveryQuery,
    call_discover,
)
from trustswarm.protocol.errors import ProtocolError
from trustswarm.protocol.framing import receive_message, send_message
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.limits import DISCOVERY_LIMITS, DISCOVERY_PAGE_RECORDS
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host
from trustswarm.testing.hostile_records import hostile_discover_server_cls, junk_records
from trustswarm.testing.local_swarm import LocalSwarm

DIGEST = "d" * 64
TEXT = st.text(max_size=40) | st.sampled_from(
    ["NaN", "inf", "-1", "1e308", "99999999", "", "0", "4096", "7", "１２", "9" * 5000]
)


@cache
def pool(n: int = 90) -> tuple[SignedAnnouncement, ...]:
    """n signed announcements of distinct identities over a 30-block model."""
    rng, now, out = random.Random(0), time.time(), []
    for _ in range(n):
        who = Identity.generate()
        start = rng.randrange(30)
        ann = Announcement(
            str(who.peer_id), "m", start, rng.randrange(start + 1, 31), DIGEST, "float32",
            100.0, ("/ip4/198.18.0.1/tcp/1",), now, now + 3000,
        )  # fmt: skip
        out.append(sign_announcement(who, ann))
    return tuple(out)


# ---- parsing ---------------------------------------------------------------------


@given(st.dictionaries(st.sampled_from(["start", "end", "cursor", "peers", "x"]), TEXT))
def test_a_query_from_the_wire_parses_or_is_refused(meta):
    try:
        query = DiscoveryQuery.from_message(Message(meta=meta))
    except ProtocolError:
        return
    assert 0 <= query.start < query.end <= 4096
    assert DiscoveryQuery.from_message(query.to_message()) == query


@given(st.lists(TEXT | st.integers() | st.none() | st.floats(), max_size=40))
def test_query_peers_are_bounded(peers):
    meta = {"start": "0", "end": "3", "peers": json.dumps(peers)}
    try:
        query = DiscoveryQuery.from_message(Message(meta=meta))
    except ProtocolError:
        return
    assert len(query.peers) <= 16 and all(isinstance(p, str) and p for p in query.peers)


@pytest.mark.parametrize("bad", ["[1e999]", "NaN", "{}", "[" * 5000, '"x"'])
def test_malformed_peers_json_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        DiscoveryQuery.from_message(Message(meta={"start": "0", "end": "3", "peers": bad}))


@given(st.text(max_size=80))
def test_a_cursor_parses_or_is_refused(cursor):
    try:
        seed, last = parse_cursor(cursor)
    except ProtocolError:
        return
    assert len(seed) == 16 and (last == b"" if not cursor else len(last) == 8)


@given(
    st.dictionaries(
        st.sampled_from(["r.0", "r.1", "r.x", "next", "matching", "other"]),
        TEXT | st.sampled_from(['{"announcement": 1}', "a" * 70, "-5", "1e9999"]),
    )
)
def test_a_page_from_the_wire_parses_or_is_refused(meta):
    try:
        page = DiscoveryPage.from_message(Message(meta=meta))
    except ProtocolError:
        return
    assert len(page.records) <= DISCOVERY_PAGE_RECORDS and 0 <= page.matching <= 10**9
    good, bad = page.announcements()  # never raises
    assert len(good) + bad == len(page.records)


def test_bounds_refuse_nonsense():
    for bad in ({"per_block": 0}, {"page_timeout": float("nan")}, {"max_contacts": 10**9},
                {"paging_seconds": -1}, {"concurrency": 0}, {"explore": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            DiscoveryBounds(**bad)


# ---- the server's pages ----------------------------------------------------------


def page_through(known, start: int, end: int, mutate=None) -> list[list[str]]:  # noqa: ANN001
    pages, cursor = [], ""
    for _ in range(50):
        page = answer_query(known, DiscoveryQuery(start, end, cursor))
        message = encode_message(page.to_message())  # every page fits the wire limits
        assert len(message) <= DISCOVERY_LIMITS.max_frame_bytes
        assert len(page.records) <= DISCOVERY_PAGE_RECORDS
        pages.append([json.loads(r)["announcement"]["peer_id"] for r in page.records])
        if not page.next_cursor:
            return pages
        cursor = page.next_cursor
        if mutate is not None:
            known = mutate(known)
    raise AssertionError("paging did not end")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 29), st.integers(1, 30), st.integers(0, 90))
def test_paging_returns_every_matching_record_exactly_once(start, length, n):
    end = min(30, start + length)
    known = list(pool()[:n])
    pages = page_through(known, start, end)
    seen = [p for page in pages for p in page]
    matching = {
        s.announcement.peer_id
        for s in known
        if s.announcement.start < end and start < s.announcement.end
    }
    assert len(seen) == len(set(seen)) and set(seen) == matching


def test_records_added_or_gone_between_pages_never_repeat_the_rest():
    known = list(pool()[:60])
    extra = list(pool()[60:])

    def churn(current):  # noqa: ANN001, ANN202
        arriving = [extra.pop() for _ in range(min(3, len(extra)))]
        return current[1:] + arriving  # one leaves, up to three new ones arrive

    pages = page_through(known, 0, 30, churn)
    seen = [p for page in pages for p in page]
    assert len(seen) == len(set(seen))
    stayed = {s.announcement.peer_id for s in known[len(pages) :]}  # never removed
    assert stayed <= set(seen)


def test_two_records_of_one_peer_come_once_the_newest():
    older = pool()[0]
    ann = older.announcement
    who = Identity.generate()
    base = Announcement(str(who.peer_id), "m", 0, 30, DIGEST, "float32", 1.0,
                        ann.addrs, ann.issued_at, ann.expires_at)  # fmt: skip
    newer = Announcement(**{**base.__dict__, "issued_at": ann.issued_at + 1})
    records = [sign_announcement(who, base), sign_announcement(who, newer)]
    page = answer_query(records, DiscoveryQuery(0, 30))
    assert len(page.records) == 1 and page.matching == 1
    assert json.loads(page.records[0])["announcement"]["issued_at"] == newer.issued_at


def test_first_pages_are_a_fresh_random_order_that_boasting_cannot_buy():
    known = list(pool()[:60])
    firsts = [set(page_through(known, 0, 30)[0]) for _ in range(30)]
    assert len({frozenset(f) for f in firsts}) == 30  # a new seed each time
    counts = {s.announcement.peer_id: sum(s.announcement.peer_id in f for f in firsts)
              for s in known}  # fmt: skip
    assert min(counts.values()) >= 1  # every record reaches some first page


def test_a_forged_cursor_is_refused_and_peer_lookups_are_one_page():
    known = list(pool()[:40])
    for bad in ("0123456789abcdef.zz", "x" * 33, "0123456789abcdef", "A" * 16 + "." + "0" * 16):
        with pytest.raises(ProtocolError):
            answer_query(known, DiscoveryQuery(0, 30, bad))
    wanted = tuple(s.announcement.peer_id for s in known[:5]) + ("nobody",)
    page = answer_query(known, DiscoveryQuery(0, 1, peers=wanted))
    assert not page.next_cursor and len(page.records) == 5


# ---- the client's choices --------------------------------------------------------


@given(st.lists(st.integers(0, 20), max_size=40), st.integers(1, 20))
def test_needy_range_is_the_worst_run_below_want(counts, want):
    span = needy_range(counts, want)
    if span is None:
        assert all(c >= want for c in counts)
        return
    low, high = span
    assert all(counts[b] < want for b in range(low, high))
    assert min(counts[low:high]) == min(counts)


def test_contacts_cover_each_block_without_contacting_everyone():
    anns = [s.announcement for s in pool()]
    chosen = select_contacts(anns, [0] * 30, want=3, limit=200)
    counts = [sum(a.covers(b) for a in chosen) for b in range(30)]
    full = [sum(a.covers(b) for a in anns) for b in range(30)]
    assert all(c >= min(3, f) for c, f in zip(counts, full, strict=True))
    assert len(chosen) < len(anns)


def test_one_source_of_sybils_gets_a_fair_share_of_contacts():
    directory = Directory(30)
    anns = [s.announcement for s in pool()]
    for ann in anns[:80]:
        directory.add(ann, "sybil-peer")
    for ann in anns[80:]:
        directory.add(ann, "honest-peer")
    first = directory.ordered(lambda p: False, random.Random(1))[:20]
    assert {a.peer_id for a in anns[80:]} <= {a.peer_id for a in first}


def test_the_view_keeps_at_most_max_view_servers_covering_every_block():
    view = SwarmView("m", None)
    anns = [s.announcement for s in pool()]
    view.servers = {a.peer_id: a for a in anns}
    view.rtts = {a.peer_id: i / 100 for i, a in enumerate(anns)}
    bounds = DiscoveryBounds(per_block=3, max_view=40)
    assert prune_view(view, bounds, 30) == len(anns) - 40
    assert len(view.servers) == 40
    for block in range(30):
        available = sum(a.covers(block) for a in anns)
        assert sum(a.covers(block) for a in view.servers.values()) >= min(3, available)
    assert prune_view(view, bounds, 30) == 0  # within bounds: nothing more goes


# ---- real nodes on loopback ------------------------------------------------------


def start_client(swarm: LocalSwarm, initial: list[str], bounds: DiscoveryBounds | None):
    manifest = swarm.model_dir.manifest
    view = SwarmView(manifest.model_id, manifest.span_digest, request_timeout=5.0)
    client = SwarmClient(
        make_host(Identity.generate()), view, initial, connect_timeout=2.0, discovery=bounds
    )

    async def start() -> None:
        await swarm.start_task(client.run)

    swarm.loop.run(start)
    return client


def foreign_record(model_id: str, digest: str, start: int, end: int) -> tuple[str, bytes]:
    """A valid announcement of a server nobody runs (connection refused at port 9)."""
    who, now = Identity.generate(), time.time()
    ann = Announcement(str(who.peer_id), model_id, start, end, digest, "float32", 10.0,
                       ("/ip4/127.0.0.1/tcp/9",), now, now + 120)  # fmt: skip
    return announcement_key(model_id, ann.peer_id), sign_announcement(who, ann).to_bytes()


def wait_for(predicate, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.2)


SPANS = [(0, 3), (3, 6), (0, 6), (0, 2), (2, 4), (4, 6)]


@pytest.mark.timeout(240)
def test_a_client_finds_every_server_through_pages(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        nodes = [swarm.start_server(span) for span in SPANS]
        first = nodes[0].server
        honest = {n.peer_id for n in nodes}
        wait_for(lambda: len(answer_query_all(first)) >= len(nodes), 30)
        # Bounded: wanting 2 per block, a refresh contacts only what covers each block
        # twice (every block has 3 servers: never all 6).
        small = start_client(swarm, [nodes[0].addrs[0]], DiscoveryBounds(per_block=2, explore=0))
        counts = [sum(a.covers(b) for a in small.view.servers.values()) for b in range(6)]
        assert min(counts) >= 2 and len(small.view.servers) <= 5
        for _ in range(60):  # more than the info answer's sample and two pages hold
            key, value = foreign_record(
                first.model_id, first.model_dir.manifest.span_digest(0, 6), 0, 6
            )
            first.dht.value_store.put(key.encode(), value, validity=time.time() + 120)
        bounds = DiscoveryBounds(per_block=100, max_contacts=100, ask_peers=1)
        client = start_client(swarm, [nodes[0].addrs[0]], bounds)
        stats = client.last_discovery
        assert stats is not None and stats.pages >= 3 and stats.records >= 66
        assert stats.answered == len(honest) - 1  # all but the initial peer, re-checked
        assert set(client.view.servers) == honest
    finally:
        swarm.close()


def answer_query_all(server) -> list[str]:  # noqa: ANN001 - a BlockServer
    """Peer ids a node's discover answers name (all pages)."""
    page, out = server._discover(DiscoveryQuery(0, 6)), []
    while True:
        out += [json.loads(r)["announcement"]["peer_id"] for r in page.records]
        if not page.next_cursor:
            return out
        page = server._discover(DiscoveryQuery(0, 6, page.next_cursor))


@pytest.mark.timeout(120)
def test_established_servers_are_asked_for_by_peer_id_and_contacted_first(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        node = swarm.start_server((0, 6))
        server = node.server
        digest = server.model_dir.manifest.span_digest(0, 6)
        foreign = []
        for _ in range(60):
            key, value = foreign_record(server.model_id, digest, 0, 6)
            server.dht.value_store.put(key.encode(), value, validity=time.time() + 120)
            foreign.append(json.loads(value)["announcement"]["peer_id"])
        wanted = foreign[7:10]
        view = SwarmView(server.model_id, server.model_dir.manifest.span_digest)

        async def run() -> Directory:
            host = make_host(Identity.generate())
            async with running_host(host, []):
                info = parse_peer_addr(node.addrs[0])
                await host.connect(info)
                directory = Directory(6)
                bounds = DiscoveryBounds(pages_per_peer=1)  # the by-id page only
                pager = Pager(host, directory, view.acceptable, bounds)
                await pager.ask_all([info.peer_id], wanted)
                return directory

        directory = swarm.loop.run(run)
        assert set(directory.records) == set(wanted)
        directory.add(server.announcement.announcement, "x")
        order = directory.ordered(lambda p: p in wanted[1:], random.Random(0))
        assert {a.peer_id for a in order[:2]} == set(wanted[1:])  # established first
    finally:
        swarm.close()


@pytest.mark.timeout(240)
def test_hostile_discover_servers_get_nothing_accepted_nor_stall_the_client(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        honest = [swarm.start_server(span) for span in SPANS[:3]]
        hostile = {
            mode: swarm.start_server((0, 6), server_cls=hostile_discover_server_cls(mode))
            for mode in ("junk", "sybils", "repeat", "stall", "oversized")
        }
        bounds = DiscoveryBounds(page_timeout=2.0, paging_seconds=6.0, ask_peers=6)
        initial = [h.addrs[0] for h in hostile.values()] + [honest[0].addrs[0]]
        began = time.monotonic()
        client = start_client(swarm, initial, bounds)
        seconds = time.monotonic() - began
        stats = client.last_discovery
        servers = set(client.view.servers)
        everyone = {s.peer_id for s in swarm.servers}
        assert servers <= everyone  # no forged, Sybil or junk record made it in
        assert {h.peer_id for h in honest} <= servers
        junk = len(junk_records("m", DIGEST))
        assert stats.bad_records >= junk and stats.failed_peers >= 2  # stall + oversized
        assert hostile["repeat"].server.pages_served <= 2  # repeats end its paging
        print(f"\n[discovery] hostile peers: refresh {seconds:.1f} s, {stats}")
        assert seconds < 40, seconds
        swarm.loop.run(client.refresh)  # refreshes keep working with the same peers
        assert {h.peer_id for h in honest} <= set(client.view.servers) <= everyone
    finally:
        swarm.close()


@pytest.mark.timeout(180)
def test_without_discover_peers_the_client_falls_back_to_the_dht(tiny_model_dir):
    class Legacy(hostile_discover_server_cls("junk")):  # answers no discover at all
        def _stream_handlers(self):  # noqa: ANN202
            return [h for h in super()._stream_handlers() if h[0] != DISCOVER]

    swarm = LocalSwarm(tiny_model_dir)
    try:
        nodes = [swarm.start_server(span, server_cls=Legacy) for span in SPANS[:3]]
        client = start_client(swarm, [nodes[0].addrs[0]], DiscoveryBounds())
        assert client.last_discovery is None  # fell back
        assert str(parse_peer_addr(nodes[0].addrs[0]).peer_id) in client.no_discover
        assert set(client.view.servers) == {n.peer_id for n in nodes}
    finally:
        swarm.close()


@pytest.mark.timeout(120)
def test_malformed_discover_requests_get_errors_and_the_server_keeps_serving(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        node = swarm.start_server((0, 6))
        bad = [
            {"start": "NaN", "end": "3"}, {"start": "-1", "end": "3"}, {"start": "5", "end": "2"},
            {"start": "0", "end": "99999999"}, {"start": "0", "end": "3", "cursor": "x" * 65},
            {"start": "0", "end": "3", "cursor": "0123456789abcdef.0"},
            {"start": "0", "end": "3", "peers": "[" * 3000},
        ]  # fmt: skip

        async def run() -> list[str]:
            host = make_host(Identity.generate())
            async with running_host(host, []):
                info = parse_peer_addr(node.addrs[0])
                await host.connect(info)
                codes = []
                for meta in bad:
                    stream = await host.new_stream(info.peer_id, [DISCOVER])
                    await send_message(stream, Message(meta=meta))
                    answer, _ = await receive_message(stream)
                    codes.append(answer.meta.get("error", ""))
                    await stream.close()
                page, size = await call_discover(host, info.peer_id, DiscoveryQuery(0, 6), 10)
                assert page.announcements()[0] and size < DISCOVERY_LIMITS.max_frame_bytes
                return codes

        codes = swarm.loop.run(run)
        assert len(codes) == len(bad) and all(codes), codes
    finally:
        swarm.close()
