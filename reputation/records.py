"""Signed reputation records: what a verifier says about one server, until when.

A record names the verifier, the subject (a server's peer id), the model and block
span, the score, state and counts, when it was issued, when it expires, and a
sequence number that increases with every record the verifier signs; optionally (newer
verifiers) when the verifier last spot-checked and last audited the server, and why it
banned it. It is signed
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
import re
import time
from dataclasses import asdict, dataclass

from libp2p.records.validator import Validator

from trustswarm.protocol.announcement import model_key
from trustswarm.protocol.errors import ProtocolError, SignatureError
from trustswarm.protocol.identity import Identity, parse_peer_id, verify_peer_signature

from .score import BANNED, STATES

_DOMAIN = b"trustswarm-reputation-v1\n"
REPUTATION_NAMESPACE = "trustswarm-rep"
MAX_RECORD_BYTES = 4096
_MAX_TEXT = 256
_STR_FIELDS = ("verifier_id", "subject", "model_id", "state")
_INT_FIELDS = ("start", "end", "passes", "failures", "sequence")
_FLOAT_FIELDS = ("score", "issued_at", "expires_at")
_OPTIONAL_TIMES = ("last_check_at", "last_audit_at")
_OPTIONAL_FIELDS = (*_OPTIONAL_TIMES, "ban_reason")
MAX_BAN_REASON = 200  # characters
MAX_CLOCK_SKEW = 300.0  # seconds a time may lie ahead of issued_at or of our clock
# C0/C1 controls, line and paragraph separators, bidi overrides: nothing that could
# reshape the text around it on a page or in a terminal.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


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
    # Optional (see the module doc): absent from the signed body when None.
    last_check_at: float | None = None  # the verifier's last spot-check of the server
    last_audit_at: float | None = None  # the last client audit it judged of the server
    ban_reason: str | None = None  # banned records only

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
        self._check_optional()

    def _check_optional(self) -> None:
        for name in _OPTIONAL_TIMES:
            value = getattr(self, name)
            if value is None:
                continue
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise ProtocolError(f"reputation record: {name} must be a finite time >= 0")
            if value > self.issued_at + MAX_CLOCK_SKEW:
                raise ProtocolError(f"reputation record: {name} lies after the record's issue")
        reason = self.ban_reason
        if reason is None:
            return
        if not isinstance(reason, str) or not 0 < len(reason) <= MAX_BAN_REASON:
            raise ProtocolError(
                f"reputation record: ban_reason must be 1-{MAX_BAN_REASON} characters"
            )
        if _UNPRINTABLE.search(reason):
            raise ProtocolError("reputation record: ban_reason holds control characters")
        if self.state != BANNED:
            raise ProtocolError("reputation record: a ban_reason on a record that is not a ban")

    def check_clock(self, now: float) -> None:
        """No time the verifier reports lies ahead of `now` by more than the skew."""
        for name in _OPTIONAL_TIMES:
            value = getattr(self, name)
            if value is not None and not value <= now + MAX_CLOCK_SKEW:
                raise ProtocolError(f"reputation record: {name} lies in the future")

    def body(self) -> dict:
        body = asdict(self)
        for name in _FLOAT_FIELDS:  # 1 and 1.0 must sign the same bytes
            body[name] = float(body[name])
        for name in _OPTIONAL_FIELDS:  # unset: the layout of records signed before them
            if body[name] is None:
                del body[name]
            elif name in _OPTIONAL_TIMES:
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
            if not isinstance(body, dict) or not _REQUIRED <= set(body) <= _ALL_FIELDS:
                raise ValueError("record fields")
            if any(body.get(name, "") is None for name in _OPTIONAL_FIELDS):
                raise ValueError("an optional field is null (leave it out)")
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
        now = time.time() if now is None else now
        if self.record.expired(now):
            raise SignatureError("reputation record has expired")
        self.record.check_clock(now)


_ALL_FIELDS = frozenset(ReputationRecord.__dataclass_fields__)
_REQUIRED = _ALL_FIELDS - set(_OPTIONAL_FIELDS)


def sign_record(identity: Identity, record: ReputationRecord) -> SignedReputationRecord:
    if record.verifier_id != str(identity.peer_id):
        raise SignatureError("a verifier may only sign records in its own name")
    record.check()
    signed = SignedReputationRecord(record, identity.sign(record.canonical_bytes()))
    if len(signed.to_bytes()) > MAX_RECORD_BYTES:  # readers would refuse it
        raise ProtocolError(f"reputation record longer than {MAX_RECORD_BYTES} bytes")
    return signed


def short_reason(text: str | None) -> str | None:
    """`text` as a valid ban_reason: whitespace runs and control characters become one
    space, cut to MAX_BAN_REASON characters (with an ellipsis); None when nothing is left."""
    if not text:
        return None
    cleaned = " ".join(_UNPRINTABLE.sub(" ", text).split())
    if len(cleaned) > MAX_BAN_REASON:
        cleaned = cleaned[: MAX_BAN_REASON - 1].rstrip() + "…"
    return cleaned or None


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
