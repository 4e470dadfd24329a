"""The discover RPC: pages of the announcements a server knows, for a range of blocks.

An info answer carries one random sample of a server's DHT store (it must fit 16 KiB),
so with a thousand servers a client would rarely see the few that hold a rare span.
A discover request names blocks [start, end) (and optionally peer ids); the answer holds
the announcements covering them, one record per metadata entry, in pages that fit the
message limits, with an opaque cursor for the next page. Servers that predate this RPC
refuse the protocol; clients then fall back to info.

Everything here is parsed as hostile: the answer's size is bounded by the codec's
limits, each record is decoded on its own (a bad one is skipped, not fatal), and the
cursor is a bounded string the client only hands back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from .announcement import MAX_BLOCKS, MAX_ID_CHARS, SignedAnnouncement
from .codec import Message
from .errors import ProtocolError
from .framing import close_quietly, raise_if_error, receive_message, send_message
from .limits import DEFAULT_LIMITS, DISCOVERY_PAGE_CHARS, DISCOVERY_PAGE_RECORDS, Limits

DISCOVER = TProtocol("/trustswarm/discover/1")
RECORD_PREFIX = "r."
MAX_QUERY_PEERS = 16  # peer ids one request may ask for (e.g. established servers)
MAX_CURSOR_CHARS = 64
_CURSOR_CHARS = re.compile(r"[0-9A-Za-z._:-]*")


def _parse_int(meta: dict[str, str], name: str, low: int, high: int) -> int:
    raw = meta.get(name)
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        raise ProtocolError(f"discover request field {name!r} is not a small integer")
    value = int(raw)
    if not low <= value <= high:
        raise ProtocolError(f"discover request field {name!r}={value} not in [{low}, {high}]")
    return value


def check_cursor(cursor: object) -> str:
    if not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_CHARS:
        raise ProtocolError(f"a cursor is a string of at most {MAX_CURSOR_CHARS} characters")
    if not _CURSOR_CHARS.fullmatch(cursor):
        raise ProtocolError("a cursor holds only letters, digits and . _ : -")
    return cursor


@dataclass(frozen=True)
class DiscoveryQuery:
    """Announcements covering any block of [start, end), from `cursor` on; with `peers`,
    only those peers' announcements (one page, no cursor)."""

    start: int
    end: int
    cursor: str = ""
    peers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if type(self.start) is not int or type(self.end) is not int:
            raise ProtocolError("a discover range is two integers")
        if not 0 <= self.start < self.end <= MAX_BLOCKS:
            raise ProtocolError(f"discover range {self.start}:{self.end} not within 0:{MAX_BLOCKS}")
        check_cursor(self.cursor)
        if not isinstance(self.peers, tuple) or len(self.peers) > MAX_QUERY_PEERS:
            raise ProtocolError(f"a discover request names at most {MAX_QUERY_PEERS} peers")
        for peer in self.peers:
            if not isinstance(peer, str) or not 0 < len(peer) <= MAX_ID_CHARS:
                raise ProtocolError("a peer id is a string of 1-256 characters")

    def covers(self, start: int, end: int) -> bool:
        return start < self.end and self.start < end

    def to_message(self) -> Message:
        meta = {"start": str(self.start), "end": str(self.end), "cursor": self.cursor}
        if self.peers:
            meta["peers"] = json.dumps(list(self.peers))
        return Message(meta=meta)

    @classmethod
    def from_message(cls, message: Message) -> DiscoveryQuery:
        meta = message.meta
        start = _parse_int(meta, "start", 0, MAX_BLOCKS - 1)
        end = _parse_int(meta, "end", 1, MAX_BLOCKS)
        peers: tuple[str, ...] = ()
        if "peers" in meta:
            try:
                raw = json.loads(meta["peers"])
            except (ValueError, RecursionError):
                raise ProtocolError("discover request 'peers' is not JSON") from None
            if not isinstance(raw, list):
                raise ProtocolError("discover request 'peers' is not a list")
            peers = tuple(raw)
        return cls(start, end, meta.get("cursor", ""), peers)


@dataclass(frozen=True)
class DiscoveryPage:
    """Encoded announcements (each decoded on its own by the reader), the cursor of the
    next page ("" when this was the last) and how many records matched in all."""

    records: tuple[str, ...]
    next_cursor: str = ""
    matching: int = 0

    def to_message(self) -> Message:
        meta = {RECORD_PREFIX + str(i): text for i, text in enumerate(self.records)}
        meta["next"] = check_cursor(self.next_cursor)
        meta["matching"] = str(max(0, int(self.matching)))
        return Message(meta=meta)

    @classmethod
    def from_message(cls, message: Message) -> DiscoveryPage:
        """Bounded by the codec already (entries, value length, header size); this keeps
        only record entries and refuses a malformed cursor."""
        meta = message.meta
        records = tuple(
            value
            for key, value in meta.items()
            if key.startswith(RECORD_PREFIX) and isinstance(value, str)
        )[:DISCOVERY_PAGE_RECORDS]
        raw = meta.get("matching", "0")
        small = raw.isascii() and raw.isdigit() and len(raw) <= 10  # not int("9" * 5000)
        matching = min(int(raw), 10**9) if small else 0
        return cls(records, check_cursor(meta.get("next", "")), matching)

    def announcements(self) -> tuple[list[SignedAnnouncement], int]:
        """The records that decode (not yet signature-checked), and how many did not."""
        good, bad = [], 0
        for text in self.records:
            try:
                good.append(SignedAnnouncement.from_bytes(text.encode()))
            except (ProtocolError, UnicodeError):
                bad += 1
        return good, bad


def page_cost(text: str) -> int:
    """Characters one record adds to a page's header (JSON-escaped, plus its key)."""
    return len(json.dumps(text)) + len(RECORD_PREFIX) + 8


def fill_page(
    encoded: list[str], next_cursor: str, matching: int, budget: int = DISCOVERY_PAGE_CHARS
) -> tuple[DiscoveryPage, int]:
    """The longest prefix of `encoded` that fits a page; returns it and how many it took
    (the caller's next offset). At least one record is taken when there is one: a
    record is at most 8 KiB, and a page that always fits one always makes progress."""
    taken, used = [], 0
    for text in encoded[:DISCOVERY_PAGE_RECORDS]:
        cost = page_cost(text)
        if taken and used + cost > budget:
            break
        taken.append(text)
        used += cost
    return DiscoveryPage(tuple(taken), next_cursor, matching), len(taken)


async def call_discover(
    host: IHost,
    peer_id: ID,
    query: DiscoveryQuery,
    timeout: float,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[DiscoveryPage, int]:
    """One discover request; the page and the size of the answer in bytes (approx.)."""
    with trio.fail_after(timeout):
        stream = await host.new_stream(peer_id, [DISCOVER])
        try:
            await send_message(stream, query.to_message(), limits)
            answer, raw = await receive_message(stream, limits)
        finally:
            await close_quietly(stream)
    raise_if_error(answer)
    return DiscoveryPage.from_message(answer), len(raw)
