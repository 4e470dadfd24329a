"""What this node's DHT store holds about other servers."""

from __future__ import annotations

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
