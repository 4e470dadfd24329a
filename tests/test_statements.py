"""Signed statements, identities and tensor digests."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.protocol.digests import bytes_digest, tensors_digest
from trustswarm.protocol.errors import IdentityError, ProtocolError, SignatureError
from trustswarm.protocol.identity import Identity, parse_peer_id, verify_peer_signature
from trustswarm.protocol.protocols import PROTOCOL_VERSION
from trustswarm.protocol.statement import (
    DTYPES,
    KINDS,
    Expectation,
    SignedStatement,
    Statement,
    check_statement,
    sign_statement,
)

A = Identity.generate()
B = Identity.generate()
SETTINGS = settings(max_examples=80, deadline=None)

hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


def make_statement(identity: Identity = A, **overrides: object) -> Statement:
    fields: dict[str, object] = {
        "kind": "inference",
        "server_peer_id": str(identity.peer_id),
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "start": 3,
        "end": 9,
        "weights_digest": "a" * 64,
        "request_digest": bytes_digest(b"request"),
        "output_digest": bytes_digest(b"output"),
        "session_id": "session-1",
        "step": 4,
        "chain": bytes_digest(b"steps 0..3"),
        "dtype": "float32",
        "timestamp": time.time(),
    }
    fields.update(overrides)
    return Statement(**fields)  # type: ignore[arg-type]


def expectation_for(s: Statement, **overrides: object) -> Expectation:
    fields: dict[str, object] = {
        "kind": s.kind,
        "server_peer_id": parse_peer_id(s.server_peer_id),
        "model_id": s.model_id,
        "start": s.start,
        "end": s.end,
        "weights_digest": s.weights_digest,
        "request_digest": s.request_digest,
        "output_digest": s.output_digest,
        "session_id": s.session_id,
        "step": s.step,
        "chain": s.chain,
        "dtype": s.dtype,
    }
    fields.update(overrides)
    return Expectation(**fields)  # type: ignore[arg-type]


# New values per field, always of the field's type; hypothesis picks the field.
FIELD_VALUES: dict[str, st.SearchStrategy] = {
    "kind": st.sampled_from(sorted(KINDS)),
    "server_peer_id": st.sampled_from([str(B.peer_id)]) | st.text(max_size=60),
    "model_id": st.text(max_size=60),
    "start": st.integers(-(2**40), 2**40),
    "end": st.integers(-(2**40), 2**40),
    "weights_digest": hex64,
    "request_digest": hex64,
    "output_digest": hex64,
    "session_id": st.text(max_size=40),
    "step": st.integers(-(2**40), 2**40),
    "chain": hex64 | st.just("") | st.text(max_size=70),
    "dtype": st.sampled_from(sorted(DTYPES)) | st.text(max_size=10),
    "timestamp": st.floats(allow_nan=False, allow_infinity=False),
    "version": st.text(max_size=10),
}


@st.composite
def changed_field(draw: st.DrawFn, base: Statement) -> tuple[str, object]:
    name = draw(st.sampled_from(sorted(FIELD_VALUES)))
    value = draw(FIELD_VALUES[name].filter(lambda v: v != getattr(base, name)))
    return name, value


# --------------------------------------------------------------------------- signatures

BASE = make_statement()
BASE_SIGNED = sign_statement(A, BASE)


def test_sign_and_verify_round_trip() -> None:
    signed = sign_statement(A, make_statement())
    signed.verify()
    again = SignedStatement.from_meta(signed.to_meta())
    assert again == signed
    again.verify()
    check_statement(again, expectation_for(again.statement))


@SETTINGS
@given(pos=st.integers(0, 63), flip=st.integers(1, 255))
def test_flipped_signature_byte(pos: int, flip: int) -> None:
    sig = bytearray(BASE_SIGNED.signature)
    sig[pos] ^= flip
    forged = SignedStatement(BASE, bytes(sig))
    with pytest.raises(SignatureError):
        forged.verify()
    with pytest.raises(SignatureError):
        SignedStatement.from_meta(forged.to_meta()).verify()
    with pytest.raises(SignatureError):
        check_statement(forged, expectation_for(BASE))


@SETTINGS
@given(change=changed_field(BASE))
def test_changed_field_breaks_signature(change: tuple[str, object]) -> None:
    name, value = change
    forged = SignedStatement(dataclasses.replace(BASE, **{name: value}), BASE_SIGNED.signature)
    with pytest.raises(SignatureError):
        forged.verify()
    with pytest.raises(SignatureError):
        check_statement(forged, expectation_for(BASE))
    # Through the wire form: either refused as malformed or as a bad signature.
    try:
        parsed = SignedStatement.from_meta(forged.to_meta())
    except ProtocolError:
        return
    with pytest.raises(SignatureError):
        parsed.verify()


@SETTINGS
@given(data=st.data())
def test_mutated_statement_text(data: st.DataObject) -> None:
    meta = BASE_SIGNED.to_meta()
    text = meta["statement"]
    pos = data.draw(st.integers(0, len(text) - 1))
    char = data.draw(st.characters(codec="utf-8"))
    mutated = {**meta, "statement": text[:pos] + char + text[pos + 1 :]}
    try:
        parsed = SignedStatement.from_meta(mutated)
    except (ProtocolError, SignatureError):
        return
    if parsed.statement == BASE:
        parsed.verify()
    else:
        with pytest.raises(SignatureError):
            parsed.verify()


def test_signed_by_a_naming_b_fails() -> None:
    naming_b = make_statement(B)
    forged = SignedStatement(naming_b, A.sign(naming_b.canonical_bytes()))
    with pytest.raises(SignatureError):
        forged.verify()
    with pytest.raises(SignatureError):
        check_statement(forged, expectation_for(naming_b))
    with pytest.raises(SignatureError, match="own name"):
        sign_statement(A, naming_b)


def test_signature_from_another_domain_is_not_a_statement_signature() -> None:
    s = make_statement()
    raw_json = s.canonical_bytes().split(b"\n", 1)[1]
    with pytest.raises(SignatureError):
        SignedStatement(s, A.sign(raw_json)).verify()


@pytest.mark.parametrize(
    "peer_id",
    ["", "not-a-peer-id", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "1" * 50],
)
def test_statement_naming_a_bad_peer_id(peer_id: str) -> None:
    s = make_statement(server_peer_id=peer_id)
    with pytest.raises(SignatureError):
        SignedStatement(s, A.sign(s.canonical_bytes())).verify()


def test_verify_peer_signature_directly() -> None:
    sig = A.sign(b"data")
    verify_peer_signature(A.peer_id, b"data", sig)
    for peer, data, signature in [
        (B.peer_id, b"data", sig),
        (A.peer_id, b"datb", sig),
        (A.peer_id, b"data", sig[:-1]),
        (A.peer_id, b"data", b""),
    ]:
        with pytest.raises(SignatureError):
            verify_peer_signature(peer, data, signature)
    with pytest.raises(IdentityError):
        parse_peer_id("definitely not base58 0OIl")


# --------------------------------------------------------------------------- malformed meta


def _meta_with(**statement_overrides: object) -> dict[str, str]:
    meta = BASE_SIGNED.to_meta()
    raw = json.loads(meta["statement"])
    raw.update(statement_overrides)
    raw = {k: v for k, v in raw.items() if v is not _DROP}
    return {**meta, "statement": json.dumps(raw)}


_DROP = object()


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"statement": BASE_SIGNED.to_meta()["statement"]},
        {"signature": BASE_SIGNED.signature.hex()},
        {**BASE_SIGNED.to_meta(), "signature": "zz" * 64},
        {**BASE_SIGNED.to_meta(), "signature": BASE_SIGNED.signature.hex()[:-2]},
        {**BASE_SIGNED.to_meta(), "signature": BASE_SIGNED.signature.hex() + "00"},
        {**BASE_SIGNED.to_meta(), "signature": ""},
    ],
)
def test_bad_signature_field(meta: dict[str, str]) -> None:
    with pytest.raises(SignatureError):
        SignedStatement.from_meta(meta)


@pytest.mark.parametrize(
    "meta",
    [
        {**BASE_SIGNED.to_meta(), "statement": "not json"},
        {**BASE_SIGNED.to_meta(), "statement": "[]"},
        {**BASE_SIGNED.to_meta(), "statement": "[" * 100_000},
        {**BASE_SIGNED.to_meta(), "statement": '{"start":' + "1" * 5000 + "}"},
        _meta_with(start="3"),
        _meta_with(start=True),
        _meta_with(step=4.0),
        _meta_with(timestamp="now"),
        _meta_with(timestamp=None),
        _meta_with(kind="sideways"),
        _meta_with(model_id=None),
        _meta_with(model_id="m" * 257),
        _meta_with(weights_digest="A" * 64),
        _meta_with(request_digest="ab"),
        _meta_with(output_digest="g" * 64),
        _meta_with(extra="field"),
        _meta_with(version=_DROP),
        _meta_with(chain=_DROP),
        _meta_with(dtype=_DROP),
        _meta_with(chain=""),  # an inference step chained to nothing
        _meta_with(chain="A" * 64),
        _meta_with(chain="a" * 63),
        _meta_with(chain=None),
        _meta_with(dtype="float64"),
        _meta_with(dtype="torch.float32"),
        _meta_with(dtype=""),
        _meta_with(dtype=32),
        _meta_with(session_id=""),
        _meta_with(step=-1),
        _meta_with(kind="forward"),  # still carries a session, a step and a chain
        _meta_with(kind="backward", session_id="", step=0),  # ... a chain
        _meta_with(kind="forward", session_id="", chain=""),  # ... a step
        _meta_with(kind="forward", step=0, chain=""),  # ... a session id
    ],
)
def test_malformed_statement(meta: dict[str, str]) -> None:
    with pytest.raises(ProtocolError):
        SignedStatement.from_meta(meta)


SESSION_FIELD_VALUES = {
    "kind": st.sampled_from(sorted(KINDS)),
    "session_id": st.sampled_from(["", "abcdefgh." + "0" * 32]) | st.text(max_size=12),
    "step": st.sampled_from([0, 1]) | st.integers(-5, 5),
    "chain": st.sampled_from(["", "0" * 64]) | hex64 | st.text(max_size=70),
    "dtype": st.sampled_from(sorted(DTYPES)) | st.text(max_size=12),
}


def _session_rule_holds(raw: dict) -> bool:
    """The statement rule, written out once more: what from_json must accept."""
    hex_digest = len(raw["chain"]) == 64 and set(raw["chain"]) <= set("0123456789abcdef")
    if raw["dtype"] not in ("float32", "bfloat16", "float16"):
        return False
    if raw["kind"] == "inference":
        return bool(raw["session_id"]) and raw["step"] >= 0 and hex_digest
    return raw["session_id"] == "" and raw["step"] == 0 and raw["chain"] == ""


@SETTINGS
@given(values=st.fixed_dictionaries(SESSION_FIELD_VALUES))
def test_session_fields_and_dtype_follow_the_rule(values: dict) -> None:
    """kind, session id, step, chain and dtype: accepted exactly when the rule holds,
    and what is accepted round-trips unchanged."""
    meta = _meta_with(**values)
    if not _session_rule_holds(values):
        with pytest.raises(ProtocolError):
            SignedStatement.from_meta(meta)
        return
    parsed = SignedStatement.from_meta(meta).statement
    assert {k: getattr(parsed, k) for k in values} == values


def test_statement_domain_is_v2() -> None:
    """The format changed (chain, dtype): a v1 signature over the same fields is no
    statement signature now."""
    s = make_statement()
    old = b"trustswarm-statement-v1\n" + s.canonical_bytes().split(b"\n", 1)[1]
    assert s.canonical_bytes().startswith(b"trustswarm-statement-v2\n")
    with pytest.raises(SignatureError):
        SignedStatement(s, A.sign(old)).verify()
    assert PROTOCOL_VERSION == "2"


# --------------------------------------------------------------------------- check_statement

EXPECTATION_VALUES: dict[str, st.SearchStrategy] = {
    "kind": st.sampled_from(sorted(KINDS)),
    "server_peer_id": st.just(B.peer_id),
    "model_id": st.text(max_size=40),
    "start": st.integers(0, 100),
    "end": st.integers(0, 100),
    "weights_digest": hex64,
    "request_digest": hex64,
    "output_digest": hex64,
    "session_id": st.text(max_size=20),
    "step": st.integers(0, 100),
    "chain": hex64 | st.just(""),
    "dtype": st.sampled_from(sorted(DTYPES)),
}


@SETTINGS
@given(data=st.data())
def test_check_statement_rejects_any_mismatch(data: st.DataObject) -> None:
    expected = expectation_for(BASE)
    name = data.draw(st.sampled_from(sorted(EXPECTATION_VALUES)))
    value = data.draw(EXPECTATION_VALUES[name].filter(lambda v: v != getattr(expected, name)))
    with pytest.raises(SignatureError, match=name):
        check_statement(BASE_SIGNED, dataclasses.replace(expected, **{name: value}))


def test_check_statement_accepts_exact_match_outside_sessions() -> None:
    s = make_statement(kind="forward", session_id="", step=0, chain="")
    check_statement(sign_statement(A, s), expectation_for(s))
    # Defaults of Expectation are "no session".
    expected = expectation_for(s)
    check_statement(
        sign_statement(A, s), dataclasses.replace(expected, session_id="", step=0, chain="")
    )


def test_check_statement_rejects_other_protocol_version() -> None:
    s = make_statement(version="0")
    assert PROTOCOL_VERSION != "0"
    with pytest.raises(SignatureError, match="version"):
        check_statement(sign_statement(A, s), expectation_for(s))


@pytest.mark.parametrize(
    ("offset", "ok"),
    [(0, True), (-299, True), (299, True), (-301, False), (301, False), (-1e9, False)],
)
def test_check_statement_timestamp(offset: float, ok: bool) -> None:
    s = make_statement(timestamp=time.time() + offset)
    signed = sign_statement(A, s)
    if ok:
        check_statement(signed, expectation_for(s))
    else:
        with pytest.raises(SignatureError, match="timestamp"):
            check_statement(signed, expectation_for(s))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_statement_non_finite_timestamp(bad: float) -> None:
    """A server must not be able to sign a statement that never goes stale."""
    s = make_statement(timestamp=bad)
    signed = SignedStatement.from_meta(sign_statement(A, s).to_meta())
    with pytest.raises(SignatureError, match="timestamp"):
        check_statement(signed, expectation_for(s))


def test_check_statement_custom_skew() -> None:
    s = make_statement(timestamp=time.time() - 50)
    signed = sign_statement(A, s)
    with pytest.raises(SignatureError):
        check_statement(signed, expectation_for(s, max_clock_skew=10.0))
    check_statement(signed, expectation_for(s, max_clock_skew=100.0))


def test_check_statement_verifies_signature_first() -> None:
    forged = SignedStatement(BASE, bytes(64))
    with pytest.raises(SignatureError, match="bad signature"):
        check_statement(forged, expectation_for(BASE))


# --------------------------------------------------------------------------- identity


def test_load_or_create_is_stable_and_private(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = Identity.load_or_create(path)
    assert first.peer_id == second.peer_id
    s = make_statement(first)
    sign_statement(second, s).verify()  # the reloaded key signs as the same peer


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"\x08\x01\x12\x40" + b"\0" * 64, b"\x08\x00\x12\x03abc", bytes(range(256))],
)
def test_corrupt_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError):
        Identity.load_or_create(path)


def test_non_ed25519_key_file(tmp_path: Path) -> None:
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.identity_utils import save_identity

    path = tmp_path / "node.key"
    save_identity(create_new_key_pair(), path)
    with pytest.raises(IdentityError, match="Ed25519"):
        Identity.load_or_create(path)


def test_key_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(IdentityError):
        Identity.load_or_create(tmp_path)


# --------------------------------------------------------------------------- digests

DIGEST_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool]


@st.composite
def tensor_st(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DIGEST_DTYPES))
    shape = draw(st.lists(st.integers(1, 4), max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(-50, 50, shape, generator=gen).to(dtype)


@SETTINGS
@given(t=tensor_st(), data=st.data())
def test_digest_changes_with_any_element(t: torch.Tensor, data: st.DataObject) -> None:
    base = tensors_digest({"x": t, "y": torch.zeros(2)})
    assert tensors_digest({"x": t.clone(), "y": torch.zeros(2)}) == base
    flat = t.reshape(-1).clone()
    i = data.draw(st.integers(0, flat.numel() - 1))
    if t.dtype == torch.bool:
        flat[i] = ~flat[i]
    else:
        flat[i] = flat[i] + 1
    assert tensors_digest({"x": flat.reshape(t.shape), "y": torch.zeros(2)}) != base


@SETTINGS
@given(t=tensor_st(), other=st.sampled_from(DIGEST_DTYPES))
def test_digest_changes_with_dtype(t: torch.Tensor, other: torch.dtype) -> None:
    if other == t.dtype:
        return
    assert tensors_digest({"x": t.to(other)}) != tensors_digest({"x": t})


@SETTINGS
@given(t=tensor_st())
def test_digest_changes_with_shape_and_name(t: torch.Tensor) -> None:
    base = tensors_digest({"x": t})
    if t.shape != (t.numel(), 1):
        assert tensors_digest({"x": t.reshape(-1, 1)}) != base
    assert tensors_digest({"x": t.reshape(1, *t.shape)}) != base
    if t.dim() != 1:
        assert tensors_digest({"x": t.reshape(-1)}) != base
    assert tensors_digest({"y": t}) != base
    assert tensors_digest({"x": t, "z": t.reshape(-1)[:0]}) != base


def test_digest_is_order_and_layout_independent() -> None:
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.ones(2, dtype=torch.int64)
    assert tensors_digest({"a": a, "b": b}) == tensors_digest({"b": b, "a": a})
    assert tensors_digest({"a": a.t().contiguous().t()}) == tensors_digest({"a": a})
    assert tensors_digest({"a": a.t()}) != tensors_digest({"a": a})
    assert tensors_digest({}) == tensors_digest({})


def test_digest_of_scalar_and_empty_tensors() -> None:
    scalar = tensors_digest({"s": torch.tensor(1.5)})
    assert scalar != tensors_digest({"s": torch.tensor(2.5)})
    assert scalar != tensors_digest({"s": torch.tensor([1.5])})
    assert tensors_digest({"e": torch.zeros(0, 3)}) != tensors_digest({"e": torch.zeros(3, 0)})
