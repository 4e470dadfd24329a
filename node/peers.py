"""What this node's DHT store holds about other servers."""

from __future__ import annotations

import random
from collections.abc import Sequence

from libp2p.kad_dht.kad_dht import KadDHT

from trustswarm.protocol.announcement import SignedAnnouncement, model_key
from trustswarm.protocol.protocols import DHT_NAMESPACE


def known_announcements(dht: KadDHT, model_id: str) -> list[SignedAnnouncement]:
    """Valid, unexpired announcements for `model_id` held in this node's DHT store."""
    prefix = f"/{DHT_NAMESPACE}/{model_key(model_id)}/".encode()
    out = []
    for key, (record, _stored) in list(dht.value_store.store.items()):
        if not key.startswith(prefix):
            continue
        try:
            signed = SignedAnnouncement.from_bytes(record.value)
            signed.verify()
        except Exception:  # noqa: S112 - the validator already filtered; stale ones expire
            continue
        if signed.announcement.model_id == model_id:
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
