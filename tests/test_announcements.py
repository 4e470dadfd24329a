"""Signed announcements, the DHT validator, and a small real Kademlia swarm."""

from __future__ import annotations

import dataclasses
import json
import math
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

from trustswarm.protocol.announcement import (
    MAX_ADDRS,
    MAX_BLOCKS,
    MAX_LIFETIME,
    MAX_RECORD_BYTES,
    MAX_THROUGHPUT,
    Announcement,
    AnnouncementValidator,
    SignedAnnouncement,
    announcement_key,
    model_key,
    peer_key,
    sign_announcement,
)
from trustswarm.protocol.errors import ProtocolError, SignatureError
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.protocols import DHT_NAMESPACE
from trustswarm.protocol.transport import make_host

A = Identity.generate()
B = Identity.generate()
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
VALIDATOR = AnnouncementValidator()
SETTINGS = settings(max_examples=80, deadline=None)
REJECTED = (ProtocolError, SignatureError)


def make_announcement(identity: Identity = A, **overrides: object) -> Announcement:
    now = time.time()
    fields: dict[str, object] = {
        "peer_id": str(identity.peer_id),
        "model_id": MODEL,
        "start": 0,
        "end": 10,
        "weights_digest": "b" * 64,
        "dtype": "bfloat16",
        "throughput": 123.5,
        "addrs": (f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}",),
        "issued_at": now,
        "expires_at": now + 600,
    }
    fields.update(overrides)
    return Announcement(**fields)  # type: ignore[arg-type]


def signed_record(identity: Identity = A, **overrides: object) -> bytes:
    return sign_announcement(identity, make_announcement(identity, **overrides)).to_bytes()


def key_of(identity: Identity, model: str = MODEL) -> str:
    return announcement_key(model, str(identity.peer_id))


NOW = time.time()  # records valid for the whole test run (MAX_LIFETIME bounds lifetimes)
BASE = sign_announcement(A, make_announcement(A, issued_at=NOW, expires_at=NOW + 3000))
BASE_BYTES = BASE.to_bytes()
BASE_KEY = key_of(A)


# --------------------------------------------------------------------------- records


def test_round_trip_and_accept() -> None:
    signed = sign_announcement(A, make_announcement())
    again = SignedAnnouncement.from_bytes(signed.to_bytes())
    assert again == signed
    again.verify()
    VALIDATOR.validate(key_of(A), signed.to_bytes())
    assert key_of(A) == f"/{DHT_NAMESPACE}/{model_key(MODEL)}/{peer_key(str(A.peer_id))}"
    assert again.announcement.covers(0) and again.announcement.covers(9)
    assert not again.announcement.covers(10)


def test_sign_refuses_another_name() -> None:
    with pytest.raises(SignatureError):
        sign_announcement(A, make_announcement(B))


FIELD_VALUES: dict[str, st.SearchStrategy] = {
    "peer_id": st.sampled_from([str(B.peer_id)]) | st.text(max_size=50),
    "model_id": st.text(max_size=40),
    "start": st.integers(0, 5),
    "end": st.integers(6, 100),
    "weights_digest": st.text(max_size=64),
    "dtype": st.sampled_from(["float32", "float16", "int8"]) | st.text(max_size=10),
    "throughput": st.floats(0, 1e6),
    "addrs": st.lists(st.text(max_size=40), max_size=3).map(tuple),
    "issued_at": st.floats(0, NOW + 3000),
    "expires_at": st.floats(NOW, 1e12),
}


@SETTINGS
@given(data=st.data())
def test_altered_field_is_rejected(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(FIELD_VALUES)))
    value = data.draw(FIELD_VALUES[name].filter(lambda v: v != getattr(BASE.announcement, name)))
    forged = SignedAnnouncement(
        dataclasses.replace(BASE.announcement, **{name: value}), BASE.signature
    )
    with pytest.raises(REJECTED):
        VALIDATOR.validate(BASE_KEY, forged.to_bytes())
    with pytest.raises(SignatureError):
        forged.verify()


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, len(BASE_BYTES) - 1), byte=st.integers(0, 255))
def test_mutated_record_bytes(pos: int, byte: int) -> None:
    data = bytearray(BASE_BYTES)
    data[pos] = byte
    try:
        parsed = SignedAnnouncement.from_bytes(bytes(data))
    except ProtocolError:
        return
    if parsed == BASE:  # e.g. whitespace or hex case: the same record
        VALIDATOR.validate(BASE_KEY, bytes(data))
    else:
        with pytest.raises(REJECTED):
            VALIDATOR.validate(BASE_KEY, bytes(data))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(REJECTED):
        VALIDATOR.validate(BASE_KEY, data)


def test_signed_by_another_key() -> None:
    ann = make_announcement(B)
    forged = SignedAnnouncement(ann, A.sign(ann.canonical_bytes())).to_bytes()
    with pytest.raises(SignatureError):
        VALIDATOR.validate(key_of(B), forged)
    with pytest.raises(SignatureError):
        VALIDATOR.validate(key_of(A), forged)


def test_stored_under_another_key() -> None:
    record = signed_record(A)
    VALIDATOR.validate(key_of(A), record)
    with pytest.raises(SignatureError):
        VALIDATOR.validate(key_of(B), record)
    with pytest.raises(SignatureError):
        VALIDATOR.validate(key_of(A, "other/model"), record)
    for bad_key in [
        f"/other/{model_key(MODEL)}/{peer_key(str(A.peer_id))}",
        f"{key_of(A)}/extra",
        f"/{DHT_NAMESPACE}/{model_key(MODEL)}/{A.peer_id}",
        f"/{DHT_NAMESPACE}/{A.peer_id}",
        f"/{DHT_NAMESPACE}/{MODEL}/{A.peer_id}",
        "",
    ]:
        with pytest.raises(REJECTED):
            VALIDATOR.validate(bad_key, record)


@pytest.mark.parametrize("expires_in", [0.0, -1.0, -1e6])
def test_expired(expires_in: float) -> None:
    now = time.time()
    record = signed_record(A, issued_at=now + expires_in - 60, expires_at=now + expires_in)
    with pytest.raises(SignatureError, match="expired"):
        VALIDATOR.validate(key_of(A), record)


def signed_unchecked(identity: Identity = A, **overrides: object) -> bytes:
    """A genuinely signed record that sign_announcement would refuse to make (an
    attacker signs whatever it likes with its own key)."""
    ann = make_announcement(identity, **overrides)
    return SignedAnnouncement(ann, identity.sign(ann.canonical_bytes())).to_bytes()


@pytest.mark.parametrize(
    "overrides",
    [
        {"expires_at": math.nan},
        {"expires_at": math.inf},  # py-libp2p would keep it 24 h
        {"expires_at": NOW + 1e6},  # a lifetime beyond MAX_LIFETIME
        {"issued_at": math.nan},
        {"throughput": math.nan},
        {"throughput": math.inf},
        {"throughput": 1e308},  # would take every route, and overflow sums
        {"throughput": -1.0},
        {"throughput": 0.0},
        {"start": 0, "end": MAX_BLOCKS + 1},
        {"addrs": ("not a multiaddr",)},
        {"addrs": ("/ip4/999.0.0.1/tcp/1",)},
        {"addrs": tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(MAX_ADDRS + 1))},
        {"dtype": "int8"},
        {"weights_digest": "B" * 64},
        {"model_id": ""},
        {"model_id": "m" * 300},
    ],
)
def test_hostile_fields_in_a_genuinely_signed_record(overrides: dict) -> None:
    """Signed by the attacker's own key, so only the field checks can refuse it: on
    decoding (every path), in the DHT validator, and at signing time for our servers."""
    record = signed_unchecked(A, **overrides)
    with pytest.raises(ProtocolError, match="malformed"):
        SignedAnnouncement.from_bytes(record)
    with pytest.raises(ProtocolError):
        VALIDATOR.validate(key_of(A), record)
    with pytest.raises(ProtocolError, match="cannot announce"):
        sign_announcement(A, make_announcement(A, **overrides))


@settings(max_examples=200, deadline=None)
@given(
    throughput=st.floats(allow_nan=True, allow_infinity=True),
    issued=st.floats(allow_nan=True, allow_infinity=True),
    lifetime=st.floats(allow_nan=True, allow_infinity=True),
    start=st.integers(-5, MAX_BLOCKS + 5),
    length=st.integers(-2, 50),
)
def test_decoded_announcements_are_always_bounded(
    throughput: float, issued: float, lifetime: float, start: int, length: int
) -> None:
    record = signed_unchecked(
        A, throughput=throughput, issued_at=issued, expires_at=issued + lifetime,
        start=start, end=start + length,
    )  # fmt: skip
    try:
        ann = SignedAnnouncement.from_bytes(record).announcement
    except ProtocolError:
        return
    assert 0 < ann.throughput <= MAX_THROUGHPUT
    assert 0 < ann.expires_at - ann.issued_at <= MAX_LIFETIME
    assert 0 <= ann.start < ann.end <= MAX_BLOCKS


def test_expired_with_explicit_now() -> None:
    ann = make_announcement(A, issued_at=100.0, expires_at=200.0)
    assert not ann.expired(199.9)
    assert ann.expired(200.0)
    signed = sign_announcement(A, ann)
    signed.verify(now=150.0)
    with pytest.raises(SignatureError):
        signed.verify(now=250.0)


def _body(**changes: object) -> bytes:
    raw = json.loads(BASE_BYTES)
    for name, value in changes.items():
        if value is _DROP:
            del raw["announcement"][name]
        else:
            raw["announcement"][name] = value
    return json.dumps(raw).encode()


_DROP = object()


@pytest.mark.parametrize(
    "record",
    [
        b"",
        b"null",
        b"[]",
        b'"x"',
        b"{}",
        b"\xff" * 10,
        b"[" * 100_000,
        json.dumps({"announcement": {}, "signature": ""}).encode(),
        json.dumps({"announcement": json.loads(BASE_BYTES)["announcement"]}).encode(),
        json.dumps({**json.loads(BASE_BYTES), "signature": "xyz"}).encode(),
        json.dumps({**json.loads(BASE_BYTES), "signature": 5}).encode(),
        json.dumps({**json.loads(BASE_BYTES), "announcement": []}).encode(),
        _body(start="0"),
        _body(start=True),
        _body(start=5, end=5),
        _body(start=-1),
        _body(end=1.5),
        _body(throughput="fast"),
        _body(issued_at=None),
        _body(expires_at="later"),
        _body(peer_id=7),
        _body(model_id=None),
        _body(dtype=["f32"]),
        _body(weights_digest={}),
        _body(addrs=5),
        _body(addrs=[1]),
        _body(addrs=["x" * 600]),
        _body(extra="field"),
        _body(dtype=_DROP),
        _body(start="1" * 5000),
        b'{"announcement": {"start": ' + b"1" * 5000 + b"}}",
    ],
)
def test_malformed_record(record: bytes) -> None:
    with pytest.raises(ProtocolError):
        SignedAnnouncement.from_bytes(record)
    with pytest.raises(ProtocolError):
        VALIDATOR.validate(BASE_KEY, record)


def test_oversized_record() -> None:
    big = signed_unchecked(A, addrs=tuple(f"/ip4/10.0.0.{i}/tcp/{4000 + i}" for i in range(400)))
    assert len(big) > MAX_RECORD_BYTES
    with pytest.raises(ProtocolError, match="too large"):
        VALIDATOR.validate(key_of(A), big)


# --------------------------------------------------------------------------- select

RECORD_KINDS = ["valid", "bad_signature", "expired", "other_peer", "garbage", "other_model"]


def _record(kind: str, issued_at: float) -> bytes:
    now = time.time()
    if kind == "valid":
        return signed_record(A, issued_at=issued_at, expires_at=now + 600)
    if kind == "bad_signature":
        ann = make_announcement(A, issued_at=issued_at)
        return SignedAnnouncement(ann, B.sign(ann.canonical_bytes())).to_bytes()
    if kind == "expired":
        return signed_record(A, issued_at=issued_at, expires_at=now - 1)
    if kind == "other_peer":
        return signed_record(B, issued_at=issued_at)
    if kind == "other_model":
        return signed_record(A, issued_at=issued_at, model_id="other/model")
    return b"\x00not a record" + str(issued_at).encode()


@settings(max_examples=60, deadline=None)
@given(
    records=st.lists(
        st.tuples(st.sampled_from(RECORD_KINDS), st.integers(0, 20).map(lambda i: NOW - 100 + i)),
        min_size=1,
        max_size=6,
    )
)
def test_select_prefers_newest_valid(records: list[tuple[str, float]]) -> None:
    values = [_record(kind, issued) for kind, issued in records]
    best = VALIDATOR.select(BASE_KEY, values)
    assert 0 <= best < len(values)
    valid = [issued for kind, issued in records if kind == "valid"]
    if valid:
        assert records[best][0] == "valid"
        assert records[best][1] == max(valid)
        VALIDATOR.validate(BASE_KEY, values[best])


def test_select_keeps_newer_record() -> None:
    old = signed_record(A, issued_at=time.time() - 100)
    new = signed_record(A, issued_at=time.time())
    assert VALIDATOR.select(BASE_KEY, [old, new]) == 1
    assert VALIDATOR.select(BASE_KEY, [new, old]) == 0


# --------------------------------------------------------------------------- real DHT

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


async def _dht_scenario() -> None:
    identities = [Identity.generate() for _ in range(3)]
    a_id, b_id, _c_id = identities
    hosts = [make_host(identity) for identity in identities]
    async with AsyncExitStack() as stack:
        dhts: list[KadDHT] = []
        for host in hosts:
            await stack.enter_async_context(host.run(listen_addrs=[LOOPBACK]))
            dht = KadDHT(host, DHTMode.SERVER)
            dht.register_validator(DHT_NAMESPACE, AnnouncementValidator())
            await stack.enter_async_context(background_trio_service(dht))
            dhts.append(dht)
        for i, host in enumerate(hosts):
            for j, other in enumerate(hosts):
                if i < j:
                    await host.connect(PeerInfo(other.get_id(), other.get_addrs()))
        for i, dht in enumerate(dhts):
            for j, other in enumerate(hosts):
                if i != j:
                    await dht.add_peer(other.get_id())
            await dht.refresh_routing_table()
        dht_a, _dht_b, dht_c = dhts

        # A valid record put at A is readable at C.
        key = announcement_key(MODEL, str(a_id.peer_id))
        record = sign_announcement(a_id, make_announcement(a_id)).to_bytes()
        got = None
        while got is None:  # retried within the test's time bound
            await dht_a.put_value(key, record)
            with trio.move_on_after(5):
                got = await dht_c.get_value(key)
            if got is None:
                await trio.sleep(0.2)
        assert got == record
        assert dht_c.value_store.get(key.encode()) is not None

        # Forgeries: a record naming B signed by A, and A's own record under B's key.
        b_key = announcement_key(MODEL, str(b_id.peer_id))
        naming_b = make_announcement(b_id)
        forged_sig = SignedAnnouncement(naming_b, a_id.sign(naming_b.canonical_bytes())).to_bytes()
        for forged in (forged_sig, record):
            with pytest.raises(REJECTED):
                await dht_a.put_value(b_key, forged)
        assert dht_a.value_store.get(b_key.encode()) is None

        # Bypass A's own check and push the forgery straight to C: C refuses to store it.
        with trio.move_on_after(5):
            await dht_a.value_store._store_at_peer(hosts[2].get_id(), b_key.encode(), forged_sig)
        assert dht_c.value_store.get(b_key.encode()) is None
        with trio.move_on_after(5):
            assert await dht_c.get_value(b_key) is None

        # Control: the same path does deliver B's genuine record, so the refusal above
        # is C's validator at work, not a lost message.
        genuine = sign_announcement(b_id, naming_b).to_bytes()
        with trio.move_on_after(5):
            while dht_c.value_store.get(b_key.encode()) is None:
                await dht_a.value_store._store_at_peer(hosts[2].get_id(), b_key.encode(), genuine)
        stored = dht_c.value_store.get(b_key.encode())
        assert stored is not None and stored.value == genuine


def test_real_dht_accepts_valid_and_refuses_forged() -> None:
    async def main() -> None:
        with trio.fail_after(30):
            await _dht_scenario()

    trio.run(main)


def test_a_span_outside_the_model_is_ignored_not_fatal() -> None:
    """A validly signed announcement of blocks 0:40 of a 30-block model made every new
    client's from_pretrained fail; the view now just does not consider it."""
    from trustswarm.client.swarm import SwarmView

    def span_digest(start: int, end: int) -> str:
        if not 0 <= start < end <= 30:
            raise ValueError(f"bad span {start}:{end}")
        return "b" * 64

    view = SwarmView(model_id=MODEL, span_digest=span_digest, request_timeout=5.0)
    assert not view.consider(sign_announcement(A, make_announcement(A, start=0, end=40)))
    assert view.consider(sign_announcement(B, make_announcement(B, start=0, end=30)))
    assert list(view.servers) == [str(B.peer_id)]
