"""Signed server announcements: which blocks a server holds, how fast, until when.

They are stored in the Kademlia DHT under /trustswarm/<model key>/<peer id> and
returned by a server's info RPC. The DHT validator (on every node) rejects records
signed by anyone but the peer named in the key, expired records, and older ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

from libp2p.records.validator import Validator

from .errors import ProtocolError, SignatureError
from .identity import Identity, parse_peer_id, verify_peer_signature
from .protocols import DHT_NAMESPACE

_DOMAIN = b"trustswarm-announcement-v1\n"
MAX_RECORD_BYTES = 8192


@dataclass(frozen=True)
class Announcement:
    peer_id: str
    model_id: str
    start: int
    end: int
    weights_digest: str
    dtype: str
    throughput: float  # tokens/s the server measured for its span at start
    addrs: tuple[str, ...]
    issued_at: float
    expires_at: float

    def canonical_bytes(self) -> bytes:
        body = asdict(self)
        body["addrs"] = list(self.addrs)
        return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def covers(self, block: int) -> bool:
        return self.start <= block < self.end

    def expired(self, now: float | None = None) -> bool:
        return not (time.time() if now is None else now) < self.expires_at  # NaN: expired


@dataclass(frozen=True)
class SignedAnnouncement:
    announcement: Announcement
    signature: bytes

    def to_bytes(self) -> bytes:
        body = json.loads(self.announcement.canonical_bytes()[len(_DOMAIN) :])
        return json.dumps({"announcement": body, "signature": self.signature.hex()}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedAnnouncement:
        if len(data) > MAX_RECORD_BYTES:
            raise ProtocolError("announcement record too large")
        try:
            raw = json.loads(data)
            body, signature = raw["announcement"], bytes.fromhex(raw["signature"])
            if not isinstance(body, dict) or set(body) != set(Announcement.__dataclass_fields__):
                raise ValueError("fields")
            if not all(isinstance(a, str) and len(a) < 512 for a in body["addrs"]):
                raise ValueError("addrs")
            ann = Announcement(**{**body, "addrs": tuple(body["addrs"])})
            for name in ("peer_id", "model_id", "weights_digest", "dtype"):
                if not isinstance(getattr(ann, name), str):
                    raise ValueError(name)
            for name in ("start", "end"):
                if type(getattr(ann, name)) is not int:
                    raise ValueError(name)
            for name in ("throughput", "issued_at", "expires_at"):
                if type(getattr(ann, name)) not in (int, float):
                    raise ValueError(name)
            if not 0 <= ann.start < ann.end:
                raise ValueError("span")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ProtocolError(f"malformed announcement: {exc}") from None
        return cls(ann, signature)

    def verify(self, now: float | None = None) -> None:
        """Signature by the announced peer, and not expired. Raises SignatureError."""
        try:
            peer = parse_peer_id(self.announcement.peer_id)
        except Exception:
            raise SignatureError("announcement names an invalid peer id") from None
        verify_peer_signature(peer, self.announcement.canonical_bytes(), self.signature)
        if self.announcement.expired(now):
            raise SignatureError("announcement has expired")


def sign_announcement(identity: Identity, announcement: Announcement) -> SignedAnnouncement:
    if announcement.peer_id != str(identity.peer_id):
        raise SignatureError("a server may only announce in its own name")
    return SignedAnnouncement(announcement, identity.sign(announcement.canonical_bytes()))


# py-libp2p's DHT answers FIND_NODE only for keys that are multihashes or at most 50
# bytes long; a longer key is reset, so put/get lookups silently fall back to the
# local routing table. Every trustswarm DHT key is built to fit.
MAX_DHT_KEY_BYTES = 50


def model_key(model_id: str) -> str:
    """A DHT-safe key component for a model id (64 bits: a name, not a security check)."""
    return hashlib.sha256(model_id.encode()).hexdigest()[:16]


def peer_key(peer_id: str) -> str:
    """A DHT-safe key component for a peer id. 80 bits: to take another server's slot an
    attacker needs a second preimage (~2^80 key generations), and even then the record
    it stores must still be signed by the peer id it names."""
    return hashlib.sha256(f"trustswarm-peer/{peer_id}".encode()).hexdigest()[:20]


def announcement_key(model_id: str, peer_id: str) -> str:
    return f"/{DHT_NAMESPACE}/{model_key(model_id)}/{peer_key(peer_id)}"


def providers_key(model_id: str) -> str:
    # Hex so the DHT treats it as raw key bytes (see kad_dht._encode_key).
    return hashlib.sha256(f"trustswarm-providers/{model_id}".encode()).hexdigest()


class AnnouncementValidator(Validator):
    """DHT validator for /trustswarm/<model key>/<peer key> records."""

    def validate(self, key: str, value: bytes) -> None:
        signed = SignedAnnouncement.from_bytes(value)
        parts = key.split("/")
        if len(parts) != 4 or parts[1] != DHT_NAMESPACE:
            raise ProtocolError(f"not a trustswarm announcement key: {key[:80]!r}")
        ann = signed.announcement
        if key != announcement_key(ann.model_id, ann.peer_id):
            raise SignatureError("announcement stored under another model or peer's key")
        signed.verify()

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_time = 0, float("-inf")
        for i, value in enumerate(values):
            try:
                self.validate(key, value)
                issued = SignedAnnouncement.from_bytes(value).announcement.issued_at
            except Exception:  # noqa: S112 - an invalid candidate simply loses
                continue
            if issued > best_time:
                best, best_time = i, issued
        return best
