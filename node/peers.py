"""What this node's DHT store holds about other servers."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

from libp2p.kad_dht.kad_dht import KadDHT

from trustswarm.protocol.announcement import SignedAnnouncement, model_key
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
