"""Signed reputation records: what a verifier says about one server, until when.

A record names the verifier, the subject (a server's peer id), the model and block
span, the score, state and counts, when it was issued, when it expires, and a
sequence number that increases with every record the verifier signs. It is signed
with the verifier's Ed25519 identity over domain-separated canonical JSON (the
same layout as announcements, with another domain string, so neither can be
passed off as the other).

Records travel two ways: stored in the Kademlia DHT under
``/trustswarm-rep/<sha256 of model, verifier id, subject>`` (ReputationValidator on
every node rejects forged, expired and misplaced records, and `select` keeps the
newest sequence, so an older record cannot replace a newer one), and published on
the gossipsub topic `REPUTATION_TOPIC(model_id)`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass

from libp2p.records.validator import Validator

from trustswarm.protocol.announcement import model_key
from trustswarm.protocol.errors import ProtocolError, SignatureError
from trustswarm.protocol.identity import Identity, parse_peer_id, verify_peer_signature

from .score import STATES

_DOMAIN = b"trustswarm-reputation-v1\n"
REPUTATION_NAMESPACE = "trustswarm-rep"
MAX_RECORD_BYTES = 4096
_MAX_TEXT = 256
_STR_FIELDS = ("verifier_id", "subject", "model_id", "state")
_INT_FIELDS = ("start", "end", "passes", "failures", "sequence")
_FLOAT_FIELDS = ("score", "issued_at", "expires_at")


@dataclass(frozen=True)
class ReputationRecord:
    verifier_id: str
    subject: str  # the server's peer id
    model_id: str
    start: int
    end: int
    score: float
    state: str  # "ok" | "probation" | "banned"
    passes: int
    failures: int
    issued_at: float
    expires_at: float
    sequence: int

    def check(self) -> None:
        """Field types and ranges. Raises ProtocolError."""
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not 0 < len(value) <= _MAX_TEXT:
                raise ProtocolError(f"reputation record: {name} must be a short string")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 2**63:
                raise ProtocolError(f"reputation record: {name} must be an integer >= 0")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value):
                raise ProtocolError(f"reputation record: {name} must be a finite number")
        if self.state not in STATES:
            raise ProtocolError(f"reputation record: unknown state {self.state[:20]!r}")
        if not 0.0 <= self.score <= 1.0:
            raise ProtocolError("reputation record: score outside [0, 1]")
        if not self.start < self.end:
            raise ProtocolError("reputation record: empty block span")
        if not self.issued_at < self.expires_at:
            raise ProtocolError("reputation record: expires before it is issued")

    def body(self) -> dict:
        body = asdict(self)
        for name in _FLOAT_FIELDS:  # 1 and 1.0 must sign the same bytes
            body[name] = float(body[name])
        return body

    def canonical_bytes(self) -> bytes:
        return _DOMAIN + json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    def expired(self, now: float | None = None) -> bool:
        return not (time.time() if now is None else now) < self.expires_at

    @property
    def key(self) -> str:
        return record_key(self.verifier_id, self.subject, self.model_id)


@dataclass(frozen=True)
class SignedReputationRecord:
    record: ReputationRecord
    signature: bytes

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"record": self.record.body(), "signature": self.signature.hex()},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedReputationRecord:
        if not isinstance(data, bytes | bytearray) or len(data) > MAX_RECORD_BYTES:
            raise ProtocolError("reputation record too large or not bytes")
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or set(raw) != {"record", "signature"}:
                raise ValueError("top-level fields")
            body, signature = raw["record"], raw["signature"]
            if not isinstance(body, dict) or set(body) != set(
                ReputationRecord.__dataclass_fields__
            ):
                raise ValueError("record fields")
            if not isinstance(signature, str) or len(signature) > 256:
                raise ValueError("signature")
            record = ReputationRecord(**body)
            signature_bytes = bytes.fromhex(signature)
        except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"malformed reputation record: {exc}") from None
        record.check()
        return cls(record, signature_bytes)

    def verify(self, now: float | None = None) -> None:
        """Well-formed, signed by the named verifier, and not expired. Raises SignatureError
        (bad signature, expired) or ProtocolError (malformed)."""
        self.record.check()
        try:
            verifier = parse_peer_id(self.record.verifier_id)
        except Exception:
            raise SignatureError("reputation record names an invalid verifier id") from None
        verify_peer_signature(verifier, self.record.canonical_bytes(), self.signature)
        if self.record.expired(now):
            raise SignatureError("reputation record has expired")


def sign_record(identity: Identity, record: ReputationRecord) -> SignedReputationRecord:
    if record.verifier_id != str(identity.peer_id):
        raise SignatureError("a verifier may only sign records in its own name")
    record.check()
    return SignedReputationRecord(record, identity.sign(record.canonical_bytes()))


def record_key(verifier_id: str, subject: str, model_id: str) -> str:
    """DHT key of the newest record `verifier_id` published about `subject` for a model.

    A 128-bit digest of the three, so the key fits MAX_DHT_KEY_BYTES (two peer ids
    alone take 104 bytes).
    """
    digest = hashlib.sha256(json.dumps([model_id, verifier_id, subject]).encode()).hexdigest()
    return f"/{REPUTATION_NAMESPACE}/{digest[:32]}"


def REPUTATION_TOPIC(model_id: str) -> str:  # noqa: N802 - agreed name
    """Gossipsub topic on which verifiers publish records for `model_id`."""
    return f"/trustswarm/reputation/1/{model_key(model_id)}"


class ReputationValidator(Validator):
    """DHT validator for /trustswarm-rep/<digest of model, verifier, subject> records.

    `validate` rejects malformed, forged (not signed by the verifier in the key),
    expired and misplaced (another model, verifier or subject) records; `select`
    picks the valid record with the highest sequence number, so the DHT refuses to
    replace a record with an older (replayed) one.
    """

    def validate(self, key: str, value: bytes) -> None:
        signed = SignedReputationRecord.from_bytes(value)
        if not isinstance(key, str) or not key.startswith(f"/{REPUTATION_NAMESPACE}/"):
            raise ProtocolError(f"not a reputation record key: {str(key)[:80]!r}")
        if key != signed.record.key:
            raise SignatureError(
                "reputation record stored under another model, verifier or subject"
            )
        signed.verify()

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_sequence = 0, -1
        for i, value in enumerate(values):
            try:
                self.validate(key, value)
                sequence = SignedReputationRecord.from_bytes(value).record.sequence
            except Exception:  # noqa: S112 - an invalid candidate simply loses
                continue
            if sequence > best_sequence:
                best, best_sequence = i, sequence
        return best


def newer(candidate: SignedReputationRecord, current: SignedReputationRecord | None) -> bool:
    """Whether `candidate` supersedes `current` (same key, strictly higher sequence)."""
    return current is None or candidate.record.sequence > current.record.sequence
