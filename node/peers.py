"""What this node's DHT store holds about other servers."""

from __future__ import annotations

import hashlib
import random
import secrets
from collections import OrderedDict
from collections.abc import Sequence

from libp2p.kad_dht.kad_dht import KadDHT

from trustswarm.protocol.announcement import SignedAnnouncement, model_key
from trustswarm.protocol.discovery import DiscoveryPage, DiscoveryQuery, fill_page
from trustswarm.protocol.errors import ProtocolError
from trustswarm.protocol.limits import DISCOVERY_PAGE_RECORDS
from trustswarm.protocol.protocols import DHT_NAMESPACE


class VerifiedRecords:
    """Records already decoded and signature-checked, by their bytes: an info answer
    re-reads the whole store, and checking every signature each time (on the event loop)
    grew with the swarm. Bounded; expiry is still checked on every read."""

    def __init__(self, max_entries: int = 8192) -> None:
        self.max_entries = max_entries
        self._known: OrderedDict[bytes, SignedAnnouncement | None] = OrderedDict()

    def get(self, value: bytes) -> SignedAnnouncement | None:
        if value in self._known:
            self._known.move_to_end(value)
            signed = self._known[value]
        else:
            try:
                signed = SignedAnnouncement.from_bytes(value)
                signed.verify()
            except Exception:  # the validator already filtered; remember the refusal too
                signed = None
            self._known[value] = signed
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)
        return None if signed is None or signed.announcement.expired() else signed


def known_announcements(
    dht: KadDHT, model_id: str, verified: VerifiedRecords | None = None
) -> list[SignedAnnouncement]:
    """Valid, unexpired announcements for `model_id` held in this node's DHT store."""
    prefix = f"/{DHT_NAMESPACE}/{model_key(model_id)}/".encode()
    verified = verified or VerifiedRecords()
    out = []
    for key, (record, _stored) in list(dht.value_store.store.items()):
        if not key.startswith(prefix):
            continue
        signed = verified.get(record.value)
        if signed is not None and signed.announcement.model_id == model_id:
            out.append(signed)
    return out


# The info answer is one metadata value of at most Limits.max_meta_value_chars (16 KiB);
# this leaves room for the server's own announcement and the other fields.
INFO_KNOWN_CHARS = 12 * 1024


def sample_to_fit(
    known: Sequence[SignedAnnouncement],
    budget: int = INFO_KNOWN_CHARS,
    rng: random.Random | None = None,
) -> list[str]:
    """A random sample of `known` (encoded) whose total size fits `budget` characters.
    Each info answer carries a different sample, so asking a few servers covers a swarm
    larger than one answer holds, and no number of records (e.g. an attacker announcing
    many free identities) can make the answer too long to send."""
    encoded = [a.to_bytes().decode() for a in known]
    (rng or random).shuffle(encoded)
    out, used = [], 0
    for text in encoded:
        if used + len(text) + 8 > budget:  # + JSON quoting and separators
            continue
        out.append(text)
        used += len(text) + 8
    return out


# A page cursor is "<seed>.<rank>": the seed fixes one random order of the records (by a
# keyed hash of each peer id), the rank is the last one the client has read. The next
# page holds the matching records ranked after it, so records added or expired between
# pages neither shift nor repeat the rest (keyset paging, not offsets). An empty cursor
# starts a new order with a seed this server draws: nobody can pick a peer id that comes
# first, since the order of a seed nobody knows yet cannot be bought in advance.
_HEX_CHARS = 16
_HEX = frozenset("0123456789abcdef")


def _hex(text: str) -> bool:
    return len(text) == _HEX_CHARS and all(c in _HEX for c in text)


def parse_cursor(cursor: str) -> tuple[str, bytes]:
    """(seed, last rank read) of a cursor this module made; a fresh seed for ""."""
    if not cursor:
        return secrets.token_hex(_HEX_CHARS // 2), b""
    seed, dot, last = cursor.partition(".")
    if not dot or not _hex(seed) or not _hex(last):
        raise ProtocolError("not a discover cursor of this server")
    return seed, bytes.fromhex(last)


def rank(seed: str, peer_id: str) -> bytes:
    """Where `peer_id` comes in the order of `seed` (8 bytes, compared as bytes)."""
    return hashlib.blake2b(peer_id.encode(), key=seed.encode(), digest_size=8).digest()


def answer_query(known: Sequence[SignedAnnouncement], query: DiscoveryQuery) -> DiscoveryPage:
    """The page of `known` that answers `query`.

    Random order, not ranked: everything a server could rank by (throughput, span
    length, issue time) is what the announcer chose to sign, so a ranking would hand
    the first pages to whoever boasts most. A seeded random order gives every matching
    record the same chance on every page; clients bring their own ranking (their
    verifiers' reputation, which they can ask for by peer id)."""
    newest: dict[str, SignedAnnouncement] = {}  # one record per server, its newest
    for signed in known:
        current = newest.get(signed.announcement.peer_id)
        if current is None or current.announcement.issued_at < signed.announcement.issued_at:
            newest[signed.announcement.peer_id] = signed
    known = list(newest.values())
    if query.peers:
        wanted = set(query.peers)
        found = [s.to_bytes().decode() for s in known if s.announcement.peer_id in wanted]
        page, _ = fill_page(found, "", len(found))
        return page
    seed, last = parse_cursor(query.cursor)
    ranked = sorted(
        (
            (rank(seed, s.announcement.peer_id), s)
            for s in known
            if query.covers(s.announcement.start, s.announcement.end)
        ),
        key=lambda pair: pair[0],
    )
    after = [(r, s) for r, s in ranked if r > last]
    page, taken = fill_page(
        [s.to_bytes().decode() for _, s in after[:DISCOVERY_PAGE_RECORDS]], "", len(ranked)
    )
    if taken < len(after):
        page = DiscoveryPage(page.records, f"{seed}.{after[taken - 1][0].hex()}", len(ranked))
    return page
