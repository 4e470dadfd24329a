"""Signed server announcements: which blocks a server holds, how fast, until when.

They are stored in the Kademlia DHT under /trustswarm/<model key>/<peer id> and
returned by a server's info RPC. The DHT validator (on every node) rejects records
signed by anyone but the peer named in the key, expired records, and older ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass

from libp2p.records.validator import Validator
from multiaddr import Multiaddr

from .errors import ProtocolError, SignatureError
from .identity import Identity, parse_peer_id, verify_peer_signature
from .protocols import DHT_NAMESPACE

_DOMAIN = b"trustswarm-announcement-v1\n"
MAX_RECORD_BYTES = 8192
# Bounds on every field of a record anyone can sign with a fresh identity: whatever
# passes here is safe to sum, sort, dial and keep (NaN, Infinity, 1e308 or an
# unparsable address in one record must not break a client's routing or refresh).
ANNOUNCED_DTYPES = frozenset({"float32", "bfloat16", "float16"})
MAX_BLOCKS = 4096
MAX_THROUGHPUT = 1e9  # tokens/s: far above any real span; 1,000 of them still sum finitely
MAX_LIFETIME = 3600.0  # seconds from issued_at to expires_at (servers use 120 s)
MAX_ADDRS = 16
MAX_ADDR_CHARS = 512
MAX_ID_CHARS = 256
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


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


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ValueError(f"{name} must be a string of 1-{MAX_ID_CHARS} characters")


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if type(value) not in (int, float) or not math.isfinite(value) or not low < value <= high:
        raise ValueError(f"{name} must be a finite number in ({low:g}, {high:g}], got {value!r}")


def _check_addrs(addrs: object) -> None:
    if not isinstance(addrs, tuple) or len(addrs) > MAX_ADDRS:
        raise ValueError(f"addrs must hold at most {MAX_ADDRS} multiaddrs")
    for addr in addrs:
        if not isinstance(addr, str) or len(addr) > MAX_ADDR_CHARS:
            raise ValueError(f"each address must be a string of at most {MAX_ADDR_CHARS} chars")
        try:
            Multiaddr(addr)
        except Exception:
            raise ValueError(f"unparsable address {addr[:80]!r}") from None


def check_announcement(ann: Announcement) -> None:
    """Every field within bounds (raises ValueError): finite numbers, a span of at most
    MAX_BLOCKS, a known dtype, a bounded lifetime, parsable addresses."""
    for name in ("peer_id", "model_id"):
        _check_text(name, getattr(ann, name))
    if not isinstance(ann.weights_digest, str) or not _HEX_DIGEST.fullmatch(ann.weights_digest):
        raise ValueError("weights_digest must be 64 lowercase hex characters")
    if ann.dtype not in ANNOUNCED_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(ANNOUNCED_DTYPES)}")
    if type(ann.start) is not int or type(ann.end) is not int:
        raise ValueError("start and end must be integers")
    if not 0 <= ann.start < ann.end <= MAX_BLOCKS:
        raise ValueError(f"span {ann.start}:{ann.end} is not within 0:{MAX_BLOCKS}")
    _check_number("throughput", ann.throughput, 0.0, MAX_THROUGHPUT)
    _check_number("issued_at", ann.issued_at, 0.0, 1e11)
    if type(ann.expires_at) not in (int, float) or not math.isfinite(ann.expires_at):
        raise ValueError("expires_at must be a finite number")
    if not 0 < ann.expires_at - ann.issued_at <= MAX_LIFETIME:
        raise ValueError(f"lifetime must lie in (0, {MAX_LIFETIME:g}] s")
    _check_addrs(ann.addrs)


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
            if not isinstance(raw, dict) or not isinstance(raw.get("signature"), str):
                raise ValueError("not a signed announcement")
            body, signature = raw["announcement"], bytes.fromhex(raw["signature"])
            if not isinstance(body, dict) or set(body) != set(Announcement.__dataclass_fields__):
                raise ValueError("fields")
            if not isinstance(body["addrs"], list):
                raise ValueError("addrs must be a list")
            ann = Announcement(**{**body, "addrs": tuple(body["addrs"])})
            check_announcement(ann)
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
    try:
        check_announcement(announcement)
    except ValueError as exc:
        raise ProtocolError(f"cannot announce: {exc}") from None
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
