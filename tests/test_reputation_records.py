"""Signed reputation records and their DHT validator (unit, hypothesis, real DHT)."""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import AsyncExitStack

import multiaddr
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from trustswarm.protocol.announcement import AnnouncementValidator
from trustswarm.protocol.errors import ProtocolError, SignatureError
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.protocols import DHT_NAMESPACE
from trustswarm.protocol.transport import make_host
from trustswarm.reputation.records import (
    REPUTATION_NAMESPACE,
    REPUTATION_TOPIC,
    ReputationRecord,
    ReputationValidator,
    SignedReputationRecord,
    newer,
    record_key,
    sign_record,
)

VERIFIER = Identity.generate()
OTHER = Identity.generate()
SERVER = str(Identity.generate().peer_id)
MODEL = "tiny/model"
VALIDATOR = ReputationValidator()
SETTINGS = settings(max_examples=80, deadline=None)
REJECTED = (ProtocolError, SignatureError)


def make_record(identity: Identity = VERIFIER, **overrides: object) -> ReputationRecord:
    now = time.time()
    fields: dict[str, object] = {
        "verifier_id": str(identity.peer_id),
        "subject": SERVER,
        "model_id": MODEL,
        "start": 0,
        "end": 4,
        "score": 0.875,
        "state": "ok",
        "passes": 6,
        "failures": 0,
        "issued_at": now,
        "expires_at": now + 600,
        "sequence": 7,
    }
    fields.update(overrides)
    return ReputationRecord(**fields)  # type: ignore[arg-type]


def signed(identity: Identity = VERIFIER, **overrides: object) -> SignedReputationRecord:
    return sign_record(identity, make_record(identity, **overrides))


BASE = signed(issued_at=1e9, expires_at=4e9)
BASE_BYTES = BASE.to_bytes()
BASE_KEY = BASE.record.key


def test_round_trip_key_topic() -> None:
    again = SignedReputationRecord.from_bytes(BASE_BYTES)
    assert again == BASE
    again.verify()
    VALIDATOR.validate(BASE_KEY, BASE_BYTES)
    assert BASE_KEY.startswith(f"/{REPUTATION_NAMESPACE}/") and len(BASE_KEY) <= 128
    assert BASE_KEY == record_key(str(VERIFIER.peer_id), SERVER, MODEL)
    assert REPUTATION_TOPIC(MODEL) != REPUTATION_TOPIC("other/model")
    # An int score signs the same bytes as the float.
    fixed = {"issued_at": 1e9, "expires_at": 2e9}
    assert make_record(score=1, **fixed).canonical_bytes() == (
        make_record(score=1.0, **fixed).canonical_bytes()
    )


@SETTINGS
@given(st.data())
def test_any_altered_byte_fails(data: st.DataObject) -> None:
    raw = bytearray(BASE_BYTES)
    index = data.draw(st.integers(0, len(raw) - 1))
    replacement = data.draw(st.integers(0, 255).filter(lambda b: b != raw[index]))
    raw[index] = replacement
    try:
        parsed = SignedReputationRecord.from_bytes(bytes(raw))
    except ProtocolError:
        return
    # It parsed: either it is semantically the same record (e.g. JSON whitespace or an
    # exponent spelling), or it must fail signature checks and validation.
    if parsed == BASE:
        return
    with pytest.raises(REJECTED):
        parsed.verify()
    with pytest.raises(REJECTED):
        VALIDATOR.validate(BASE_KEY, bytes(raw))


FIELD_CHANGES = {
    "verifier_id": st.just(str(OTHER.peer_id)),
    "subject": st.text(min_size=1, max_size=60).filter(lambda s: s != SERVER),
    "model_id": st.text(min_size=1, max_size=60).filter(lambda s: s != MODEL),
    "start": st.integers(1, 3),
    "end": st.integers(5, 100),
    "score": st.floats(0, 1).filter(lambda x: x != 0.875),
    "state": st.sampled_from(["probation", "banned"]),
    "passes": st.integers(0, 10**6).filter(lambda x: x != 6),
    "failures": st.integers(1, 10**6),
    "issued_at": st.floats(0, 3e9).filter(lambda x: x != 1e9),
    "expires_at": st.floats(3e9, 5e9).filter(lambda x: x != 4e9),
    "sequence": st.integers(0, 2**62).filter(lambda x: x != 7),
}


@SETTINGS
@given(
    st.sampled_from(sorted(FIELD_CHANGES)).flatmap(
        lambda f: st.tuples(st.just(f), FIELD_CHANGES[f])
    )
)
def test_any_altered_field_fails(change: tuple[str, object]) -> None:
    name, value = change
    forged = SignedReputationRecord(
        dataclasses.replace(BASE.record, **{name: value}), BASE.signature
    )
    with pytest.raises(REJECTED):
        forged.verify()
    with pytest.raises(REJECTED):
        VALIDATOR.validate(BASE_KEY, forged.to_bytes())
    with pytest.raises(REJECTED):
        VALIDATOR.validate(forged.record.key, forged.to_bytes())


@SETTINGS
@given(
    st.sampled_from(["model", "verifier", "subject", "namespace", "short", "long"]),
)
def test_wrong_key_fails(which: str) -> None:
    parts = BASE_KEY.split("/")
    if which == "model":
        key = record_key(str(VERIFIER.peer_id), SERVER, "other")
    elif which == "verifier":
        key = record_key(str(OTHER.peer_id), SERVER, MODEL)
    elif which == "subject":
        key = record_key(str(VERIFIER.peer_id), str(OTHER.peer_id), MODEL)
    elif which == "namespace":
        key = "/".join(["", DHT_NAMESPACE, *parts[2:]])
    elif which == "short":
        key = BASE_KEY[:-1]
    else:
        key = BASE_KEY + "0"
    with pytest.raises(REJECTED):
        VALIDATOR.validate(key, BASE_BYTES)


def test_other_keys_cannot_sign_and_forgeries_fail() -> None:
    with pytest.raises(SignatureError):
        sign_record(OTHER, make_record(VERIFIER))
    # Signed by OTHER but claiming VERIFIER.
    forged = SignedReputationRecord(
        make_record(VERIFIER), OTHER.sign(make_record().canonical_bytes())
    )
    with pytest.raises(SignatureError):
        forged.verify()
    # An announcement signature cannot be replayed as a record (domain separation).
    with pytest.raises(REJECTED):
        AnnouncementValidator().validate(BASE_KEY, BASE_BYTES)


@SETTINGS
@given(st.floats(min_value=0, max_value=1e6))
def test_expired_is_rejected(past: float) -> None:
    now = time.time()
    stale = signed(issued_at=now - past - 10, expires_at=now - past)
    with pytest.raises(SignatureError):
        stale.verify()
    with pytest.raises(SignatureError):
        VALIDATOR.validate(stale.record.key, stale.to_bytes())
    # ... and loses to any valid record in select.
    fresh = signed(sequence=0)
    assert VALIDATOR.select(fresh.record.key, [stale.to_bytes(), fresh.to_bytes()]) == 1


@SETTINGS
@given(st.integers(0, 2**62), st.integers(0, 2**62), st.booleans())
def test_older_sequence_loses(a: int, b: int, swap: bool) -> None:
    ra, rb = signed(sequence=a), signed(sequence=b)
    values = [ra.to_bytes(), rb.to_bytes()]
    if swap:
        values.reverse()
    chosen = SignedReputationRecord.from_bytes(values[VALIDATOR.select(BASE_KEY, values)])
    assert chosen.record.sequence == max(a, b)
    assert newer(ra, rb) == (a > b) and newer(ra, None)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"{}",
        b"x" * 5000,
        json.dumps({"record": {}, "signature": ""}).encode(),
        BASE_BYTES.replace(b'"sequence":7', b'"sequence":-1'),
        BASE_BYTES.replace(b'"sequence":7', b'"sequence":true'),
        BASE_BYTES.replace(b'"score":0.875', b'"score":1.5'),
        BASE_BYTES.replace(b'"score":0.875', b'"score":NaN'),
        BASE_BYTES.replace(b'"state":"ok"', b'"state":"great"'),
        BASE_BYTES.replace(b'"end":4', b'"end":0'),
        BASE_BYTES.replace(b'"signature":"', b'"signature":"zz'),
        BASE_BYTES.replace(b'"passes":6', b'"passes":6,"extra":1'),
    ],
)
def test_malformed_rejected(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        SignedReputationRecord.from_bytes(raw)
    with pytest.raises(REJECTED):
        VALIDATOR.validate(BASE_KEY, raw)


# --------------------------------------------------------------------- real DHT


def test_dht_accepts_newer_refuses_older_and_forged() -> None:
    """Three Kademlia server nodes with both validators: records replicate, an older
    sequence cannot replace a newer one, and forged records are refused."""
    trio.run(_dht_scenario)


async def _dht_scenario() -> None:
    async with AsyncExitStack() as stack:
        dhts: list[KadDHT] = []
        for _ in range(3):
            host = make_host(Identity.generate())
            await stack.enter_async_context(
                host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
            )
            dht = KadDHT(host, DHTMode.SERVER)
            dht.register_validator(DHT_NAMESPACE, AnnouncementValidator())
            dht.register_validator(REPUTATION_NAMESPACE, ReputationValidator())
            await stack.enter_async_context(background_trio_service(dht))
            dhts.append(dht)
        with trio.fail_after(20):
            for a in dhts:
                for b in dhts:
                    if a is not b:
                        await a.host.connect(PeerInfo(b.host.get_id(), b.host.get_addrs()))
                        await a.add_peer(b.host.get_id())
            first = signed(sequence=10)
            key = first.record.key
            await dhts[0].put_value(key, first.to_bytes())
            second = signed(sequence=11, score=0.5, state="probation")
            await dhts[0].put_value(key, second.to_bytes())
            got = await dhts[2].get_value(key)
            assert SignedReputationRecord.from_bytes(got).record.sequence == 11
            # Replaying the older record: refused locally, and remote stores keep 11.
            with pytest.raises(ValueError):
                await dhts[0].put_value(key, first.to_bytes())
            dhts[2].value_store.remove(key.encode())  # a node that forgot: it re-sends
            await dhts[2].put_value(key, first.to_bytes())
            for dht in dhts[:2]:
                stored = dht.value_store.get(key.encode())
                assert stored is not None
                assert SignedReputationRecord.from_bytes(stored.value).record.sequence == 11
            # A forged record (wrong signer) is refused before it is stored anywhere.
            forged = SignedReputationRecord(
                make_record(sequence=99), OTHER.sign(make_record(sequence=99).canonical_bytes())
            )
            with pytest.raises(SignatureError):
                await dhts[1].put_value(key, forged.to_bytes())
