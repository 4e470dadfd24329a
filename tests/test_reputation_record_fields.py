"""The optional signed fields of reputation records (last spot-check, last audit, ban
reason): strict parsing of hostile values, and records signed before the fields existed."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.protocol.errors import ProtocolError, SignatureError
from trustswarm.protocol.identity import Identity
from trustswarm.reputation.records import (
    MAX_BAN_REASON,
    MAX_CLOCK_SKEW,
    MAX_RECORD_BYTES,
    ReputationRecord,
    ReputationValidator,
    SignedReputationRecord,
    short_reason,
    sign_record,
)

VERIFIER = Identity.generate()
SERVER = str(Identity.generate().peer_id)
SETTINGS = settings(max_examples=80, deadline=None)
REJECTED = (ProtocolError, SignatureError)
OLD_FIELDS = (
    "verifier_id", "subject", "model_id", "start", "end", "score", "state", "passes",
    "failures", "issued_at", "expires_at", "sequence",
)  # fmt: skip


def record(**overrides: object) -> ReputationRecord:
    now = time.time()
    fields: dict[str, object] = {
        "verifier_id": str(VERIFIER.peer_id), "subject": SERVER, "model_id": "tiny/model",
        "start": 0, "end": 4, "score": 0.0, "state": "banned", "passes": 3, "failures": 1,
        "issued_at": now, "expires_at": now + 600, "sequence": 11,
    }  # fmt: skip
    fields.update(overrides)
    return ReputationRecord(**fields)  # type: ignore[arg-type]


def signed_raw(body: dict) -> bytes:
    """`body` signed by VERIFIER over the records' canonical layout, as a peer could send
    it (no checks on our side: the reader must do them)."""
    canonical = (
        b"trustswarm-reputation-v1\n"
        + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    )
    signature = VERIFIER.sign(canonical).hex()
    return json.dumps({"record": body, "signature": signature}).encode()


def test_a_record_signed_before_the_fields_existed_still_verifies() -> None:
    """An old verifier signs exactly the twelve original fields: parsed and verified as it
    was, and re-serialised byte for byte (the DHT compares stored bytes)."""
    base = record(state="ok", score=0.75)
    body = {name: getattr(base, name) for name in OLD_FIELDS}
    for name in ("score", "issued_at", "expires_at"):
        body[name] = float(body[name])
    raw = signed_raw(body)
    parsed = SignedReputationRecord.from_bytes(raw)
    parsed.verify()
    assert parsed.record.last_check_at is None and parsed.record.ban_reason is None
    assert json.loads(parsed.to_bytes()) == json.loads(raw)
    assert sign_record(VERIFIER, base).record.canonical_bytes() == parsed.record.canonical_bytes()


times = st.floats(0, 1.7e9)  # up to late 2023: in the past of any run of this test


@SETTINGS
@given(check=st.none() | times, audit=st.none() | times, reason=st.none() | st.text(max_size=400))
def test_valid_fields_round_trip(check: float | None, audit: float | None, reason: str | None):
    rec = record(
        last_check_at=check,
        last_audit_at=audit,
        ban_reason=short_reason(reason),
    )
    signed = sign_record(VERIFIER, rec)
    again = SignedReputationRecord.from_bytes(signed.to_bytes())
    assert again == signed
    again.verify()
    ReputationValidator().validate(rec.key, signed.to_bytes())
    for name in ("last_check_at", "last_audit_at", "ban_reason"):
        present = getattr(rec, name) is not None
        assert (name in json.loads(signed.to_bytes())["record"]) is present


hostile_times = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-9, 1e300, 2**70, True, "1"]),
    st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda x: not (0 <= x <= 1e9 + MAX_CLOCK_SKEW)
    ),
    st.just(None),  # an explicit null: the field must be left out instead
    st.lists(st.integers(), max_size=2),
)


@SETTINGS
@given(name=st.sampled_from(["last_check_at", "last_audit_at"]), value=hostile_times)
def test_hostile_times_are_rejected(name: str, value: object) -> None:
    body = record(issued_at=1e9, expires_at=1e9 + 600).body()
    body[name] = value
    with pytest.raises(ProtocolError):
        SignedReputationRecord.from_bytes(signed_raw(body))


@SETTINGS
@given(ahead=st.floats(MAX_CLOCK_SKEW * 1.01, 1e6))
def test_times_in_the_future_are_rejected(ahead: float) -> None:
    issued = 1e9
    rec = record(issued_at=issued, expires_at=issued + 4e9, state="ok", score=0.5)
    with pytest.raises(ProtocolError):  # after the record's own issue time
        SignedReputationRecord.from_bytes(
            signed_raw({**rec.body(), "last_check_at": issued + ahead})
        )
    # Within the skew of the issue time, but the reader's clock is behind: rejected too.
    fine = sign_record(VERIFIER, dataclasses.replace(rec, last_audit_at=issued + 100))
    fine.verify(now=issued + 100)
    with pytest.raises(ProtocolError):
        fine.verify(now=issued + 100 - ahead)


hostile_reasons = st.one_of(
    st.text(min_size=MAX_BAN_REASON + 1, max_size=MAX_BAN_REASON + 50),
    st.text(max_size=20).map(lambda t: t + "\x00"),
    st.sampled_from(["", "line\nbreak", "\u202eevil", "tab\tbed", "\x9b2J", "a\u2028b"]),
    st.sampled_from([0, 1.5, True, ["x"], {"a": 1}, None]),
)


@SETTINGS
@given(reason=hostile_reasons)
def test_hostile_reasons_are_rejected(reason: object) -> None:
    body = record().body()
    body["ban_reason"] = reason
    with pytest.raises(ProtocolError):
        SignedReputationRecord.from_bytes(signed_raw(body))


def test_a_reason_only_on_a_ban_and_html_is_just_text() -> None:
    html = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'
    banned = sign_record(VERIFIER, record(ban_reason=html))
    assert SignedReputationRecord.from_bytes(banned.to_bytes()).record.ban_reason == html
    with pytest.raises(ProtocolError):
        sign_record(VERIFIER, record(state="ok", score=0.9, ban_reason="lied"))
    body = record(state="probation", score=0.4).body()
    with pytest.raises(ProtocolError):
        SignedReputationRecord.from_bytes(signed_raw({**body, "ban_reason": "lied"}))


@SETTINGS
@given(text=st.text(max_size=2000))
def test_short_reason_always_fits(text: str) -> None:
    reason = short_reason(text)
    if reason is None:
        assert all(c.isspace() or not c.isprintable() for c in text)
        return
    assert 0 < len(reason) <= MAX_BAN_REASON
    signed = sign_record(VERIFIER, record(ban_reason=reason))  # raises if it did not fit
    assert len(signed.to_bytes()) <= MAX_RECORD_BYTES
    if len(text) <= MAX_BAN_REASON and text.isprintable() and " ".join(text.split()) == text:
        assert reason == text  # a reason that already fits is kept as it is


@SETTINGS
@given(
    name=st.sampled_from(["last_check_at", "last_audit_at", "ban_reason"]),
    drop=st.booleans(),
)
def test_altering_adding_or_dropping_a_field_breaks_the_signature(name: str, drop: bool):
    rec = record(last_check_at=1e9, last_audit_at=1e9 - 5, ban_reason="signed wrong answer")
    signed = sign_record(VERIFIER, rec)
    body = json.loads(signed.to_bytes())["record"]
    if drop:
        del body[name]
    else:
        body[name] = "other reason" if name == "ban_reason" else body[name] - 1.0
    forged = json.dumps({"record": body, "signature": signed.signature.hex()}).encode()
    with pytest.raises(REJECTED):
        SignedReputationRecord.from_bytes(forged).verify()


def test_a_record_too_long_to_read_is_not_signed() -> None:
    long_model = "\U0001f600" * 256  # 12 bytes each in the JSON
    with pytest.raises(ProtocolError):
        sign_record(VERIFIER, record(model_id=long_model, ban_reason="é" * MAX_BAN_REASON))
