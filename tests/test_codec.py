"""Codec, limits and framing: round trips, hostile frames, stream reassembly."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from trustswarm.protocol import framing
from trustswarm.protocol.codec import TORCH_DTYPES, Message, decode_message, encode_message
from trustswarm.protocol.errors import (
    ERROR_CODES,
    INTERNAL,
    LimitExceededError,
    ProtocolError,
    RemoteError,
)
from trustswarm.protocol.framing import (
    StreamClosed,
    error_message,
    raise_if_error,
    read_frame,
    receive_message,
    send_message,
    write_frame,
)
from trustswarm.protocol.limits import DEFAULT_LIMITS, Limits

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = TORCH_DTYPES


# --------------------------------------------------------------------------- helpers


def make_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype in (torch.int64, torch.int32):
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)
    return (torch.randn(shape, generator=gen) * 100).to(dtype)


@st.composite
def tensors_st(draw: st.DrawFn, max_tensors: int = 4) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(
            st.text(min_size=1, max_size=12).filter(lambda n: n != "__metadata__"),
            max_size=max_tensors,
            unique=True,
        )
    )
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(list(DTYPES.values())))
        shape = draw(st.lists(st.integers(0, 5), max_size=4))
        out[name] = make_tensor(dtype, shape, draw(st.integers(0, 2**31)))
    return out


meta_st = st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=5)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def frame(header: dict | bytes, body: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + body


def spec(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def decode_or_protocol_error(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message | None:
    """Decoding may succeed or raise ProtocolError; any other exception fails the test."""
    try:
        message = decode_message(data, limits)
    except ProtocolError:
        return None
    assert isinstance(message, Message)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in message.meta.items())
    for t in message.tensors.values():
        assert isinstance(t, torch.Tensor)
        if t.is_floating_point() and t.numel():
            assert bool(torch.isfinite(t).all())
    return message


@pytest.fixture
def no_tensor_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the decoder gets as far as materialising a tensor."""

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("decoder allocated a tensor for a frame it should refuse")

    monkeypatch.setattr(torch, "empty", boom)
    monkeypatch.setattr(torch, "frombuffer", boom)


# --------------------------------------------------------------------------- round trip


@FAST
@given(tensors=tensors_st(), meta=meta_st)
def test_round_trip(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    blob = encode_message(Message(tensors, meta))
    decoded = decode_message(blob)
    assert_same_tensors(decoded.tensors, tensors)
    assert decoded.meta == meta
    # Same bytes parse the same with the reference safetensors loader.
    assert_same_tensors(safetensors_load(blob), tensors)
    # Re-encoding what we decoded is stable.
    assert decode_message(encode_message(decoded)).meta == meta


# Every dtype, bfloat16 and empty shapes drawn often, up to the 8 tensors a frame may hold,
# names and metadata from all of unicode (non-BMP, control characters, U+2028...).
wide_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=16)


@st.composite
def wire_tensors_st(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(
            wide_text.filter(lambda n: n != "__metadata__"),
            max_size=DEFAULT_LIMITS.max_tensors,
            unique=True,
        )
    )
    dtypes = st.sampled_from([torch.bfloat16, torch.bfloat16, *DTYPES.values()])
    shapes = st.lists(st.integers(0, 4), max_size=4) | st.just([0]) | st.just([3, 0, 2])
    return {
        name: make_tensor(draw(dtypes), draw(shapes), draw(st.integers(0, 2**31))) for name in names
    }


wide_meta_st = st.dictionaries(wide_text, wide_text, max_size=6)


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The metadata as the safetensors package reads it (it reads metadata from files)."""
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(blob)
        f.flush()
        with safe_open(f.name, framework="pt") as opened:
            return opened.metadata() or {}


@FAST
@given(tensors=wire_tensors_st(), meta=wide_meta_st)
def test_encoder_output_is_what_safetensors_reads(
    tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    blob = encode_message(Message(tensors, meta))
    assert_same_tensors(safetensors_load(blob), tensors)
    assert safetensors_metadata(blob) == meta
    decoded = decode_message(blob)
    assert_same_tensors(decoded.tensors, tensors)
    assert decoded.meta == meta


@FAST
@given(tensors=wire_tensors_st(), meta=wide_meta_st)
def test_safetensors_output_decodes_identically(
    tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """Frames from peers that still encode with the safetensors package decode as ours."""
    theirs = decode_message(safetensors_save(tensors, metadata=meta or None))
    ours = decode_message(encode_message(Message(tensors, meta)))
    assert_same_tensors(theirs.tensors, ours.tensors)
    assert theirs.meta == ours.meta == meta


@FAST
@given(
    tensors=wire_tensors_st(),
    meta=st.dictionaries(wide_text, wide_text, max_size=1),
)
def test_encoder_writes_the_safetensors_packages_bytes(
    tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """With at most one metadata entry (where its hash-map order cannot differ) our bytes
    are the safetensors package's bytes: same layout, JSON and padding."""
    assert encode_message(Message(tensors, meta)) == safetensors_save(
        tensors, metadata=meta or None
    )


@FAST
@given(tensors=wire_tensors_st(), meta=wide_meta_st, data=st.data())
def test_encoding_is_deterministic(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], data: st.DataObject
) -> None:
    """Same message, same bytes: whatever the dict orders, copies or memory layouts."""
    blob = encode_message(Message(tensors, meta))
    meta_order = data.draw(st.permutations(list(meta)))
    tensor_order = data.draw(st.permutations(list(tensors)))
    shuffled = Message(
        {name: _other_layout(tensors[name]) for name in tensor_order},
        {key: meta[key] for key in meta_order},
    )
    assert encode_message(shuffled) == blob
    assert encode_message(decode_message(blob)) == blob


def _other_layout(t: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed (non-contiguous) memory layout, or a copy."""
    if t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t.clone()


def test_metadata_order_does_not_change_the_bytes_across_processes() -> None:
    """The safetensors package writes metadata in its hash map's order, seeded per
    process; ours is sorted, so another process encodes the same bytes."""
    script = (
        "import sys, torch\n"
        "from trustswarm.protocol.codec import Message, encode_message\n"
        "meta = {f'k{i}': str(i) for i in range(12)}\n"
        "sys.stdout.write(encode_message(Message({'x': torch.arange(3)}, meta)).hex())\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    meta = {f"k{i}": str(i) for i in range(12)}
    assert outputs == {encode_message(Message({"x": torch.arange(3)}, meta)).hex()}


@pytest.mark.parametrize(
    "tensors",
    [
        {"__metadata__": torch.zeros(1)},
        {1: torch.zeros(1)},
        {"x": [1.0, 2.0]},
        {"x": torch.zeros(1, dtype=torch.float64)},
        {"x" * 129: torch.zeros(1)},
        {"\ud800": torch.zeros(1)},
    ],
)
def test_encode_refuses_bad_tensor_entries(tensors: dict) -> None:
    with pytest.raises(ProtocolError):
        encode_message(Message(tensors))


def test_encode_refuses_lone_surrogates_in_metadata() -> None:
    with pytest.raises(ProtocolError, match="unicode"):
        encode_message(Message(meta={"k": "\udfff"}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_finite_extremes_pass_and_every_nan_payload_is_refused(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    edges = torch.tensor([info.max, -info.max, info.tiny, -0.0, info.smallest_normal / 4])
    t = edges.to(dtype)
    assert torch.equal(decode_message(encode_message(Message({"x": t}))).tensor("x"), t)
    bits = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}[dtype]
    int_dtype = torch.int16 if bits == 16 else torch.int32
    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    exponent_all_ones = ((1 << (bits - 1 - mantissa)) - 1) << mantissa
    for sign in (0, 1):
        for payload in (0, 1, (1 << mantissa) - 1):  # inf, signalling and quiet NaNs
            raw = exponent_all_ones | payload | (sign << (bits - 1))
            if raw >= 1 << (bits - 1):
                raw -= 1 << bits
            bad = torch.tensor([0, raw], dtype=int_dtype).view(dtype)
            with pytest.raises(ProtocolError, match="NaN or Inf"):
                encode_message(Message({"x": bad}))


def test_round_trip_non_contiguous_and_scalar() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    s = torch.tensor(2.5, dtype=torch.bfloat16)
    decoded = decode_message(encode_message(Message({"t": t, "s": s}, {"k": "v"})))
    assert torch.equal(decoded.tensor("t"), t)
    assert decoded.tensor("s").shape == () and decoded.tensor("s").item() == 2.5
    assert decoded.field("k") == "v"
    with pytest.raises(ProtocolError):
        decoded.tensor("missing")
    with pytest.raises(ProtocolError):
        decoded.field("missing")
    assert decoded.optional_tensor("missing") is None


def test_decoded_tensors_are_writable_copies() -> None:
    blob = encode_message(Message({"x": torch.ones(4)}))
    decoded = decode_message(blob)
    decoded.tensor("x").add_(1)  # must not touch (or be refused by) the frame bytes
    assert torch.equal(decode_message(blob).tensor("x"), torch.ones(4))


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("0", 0),
        ("42", 42),
        ("-1", None),
        ("abc", None),
        ("1.5", None),
        ("٣", None),
        ("9" * 21, None),
        (str(2**62), 2**62),
        (str(2**62 + 1), None),
        ("", None),
    ],
)
def test_int_field(raw: str, ok: int | None) -> None:
    message = Message(meta={"n": raw})
    if ok is None:
        with pytest.raises(ProtocolError):
            message.int_field("n")
    else:
        assert message.int_field("n") == ok


# --------------------------------------------------------------------------- fuzzing


def _valid_frame(seed: int) -> bytes:
    tensors = {
        "h": make_tensor(torch.float32, [2, 3], seed),
        "ids": make_tensor(torch.int64, [3], seed + 1),
        "m": make_tensor(torch.bool, [2, 2], seed + 2),
        "e": make_tensor(torch.bfloat16, [0, 4], seed),
    }
    return encode_message(Message(tensors, {"start": "0", "end": "3"}))


VALID_FRAME = _valid_frame(7)


@settings(max_examples=400, deadline=None)
@given(pos=st.integers(0, len(VALID_FRAME) - 1), byte=st.integers(0, 255))
def test_single_byte_mutation(pos: int, byte: int) -> None:
    data = bytearray(VALID_FRAME)
    data[pos] = byte
    decode_or_protocol_error(bytes(data))


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, len(VALID_FRAME) - 1))
def test_truncation(cut: int) -> None:
    with pytest.raises(ProtocolError):
        decode_message(VALID_FRAME[:cut])


@settings(max_examples=100, deadline=None)
@given(extra=st.binary(min_size=1, max_size=64))
def test_appended_garbage(extra: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(VALID_FRAME + extra)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    decode_or_protocol_error(data)


@settings(max_examples=300, deadline=None)
@given(header=st.binary(max_size=200), body=st.binary(max_size=64))
def test_random_header_with_correct_length(header: bytes, body: bytes) -> None:
    decode_or_protocol_error(frame(header, body))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(
        st.sampled_from(["__metadata__", "a", "b"]) | st.text(max_size=6), json_values, max_size=4
    ),
    body=st.binary(max_size=32),
)
def test_random_json_header(header: dict, body: bytes) -> None:
    decode_or_protocol_error(frame(header, body))


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(["F32", "BF16", "F16", "I64", "I32", "BOOL", "F64", "U8", 3, None]),
    shape=st.lists(st.integers(-2, 2**41) | st.booleans() | st.floats(), max_size=6) | json_values,
    offsets=st.lists(st.integers(-4, 2**65), max_size=3) | json_values,
    body=st.binary(max_size=48),
)
def test_random_tensor_spec(dtype: object, shape: object, offsets: object, body: bytes) -> None:
    decode_or_protocol_error(
        frame({"x": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}, body)
    )


# --------------------------------------------------------------------------- limits


def test_huge_header_length_claim(no_tensor_allocation: None) -> None:
    with pytest.raises(LimitExceededError):
        decode_message(frame(b"{}", header_len=2**63))
    with pytest.raises(ProtocolError, match="past the end"):
        decode_message(frame(b"{}" + b" " * 90, header_len=1000))


def test_frame_over_limit() -> None:
    blob = encode_message(Message({"x": torch.zeros(64)}))
    with pytest.raises(LimitExceededError):
        decode_message(blob, Limits(max_frame_bytes=len(blob) - 1))
    with pytest.raises(LimitExceededError):
        encode_message(Message({"x": torch.zeros(64)}), Limits(max_frame_bytes=len(blob) - 1))


@pytest.mark.parametrize(
    ("shape", "error"),
    [
        ([2**40], ProtocolError),
        ([2**20, 2**20], LimitExceededError),
        ([2**12, 2**12, 2**12, 2**12], LimitExceededError),
        ([0, 2**24, 2**24], ProtocolError),  # zero elements: fails on offsets, not size
    ],
)
def test_huge_shape_fails_fast(shape: list[int], error: type, no_tensor_allocation: None) -> None:
    data = frame({"x": spec("F32", shape, [0, 4])}, b"\0" * 4)
    assert len(data) < 200
    t0 = time.perf_counter()
    with pytest.raises(error):
        decode_message(data)
    assert time.perf_counter() - t0 < 0.05


def test_too_many_elements_over_several_tensors(no_tensor_allocation: None) -> None:
    limits = Limits(max_elements=100)
    header = {f"t{i}": spec("BOOL", [40], [40 * i, 40 * (i + 1)]) for i in range(3)}
    with pytest.raises(LimitExceededError):
        decode_message(frame(header, b"\0" * 120), limits)


def test_too_many_tensors(no_tensor_allocation: None) -> None:
    header = {f"t{i}": spec("F32", [0], [0, 0]) for i in range(DEFAULT_LIMITS.max_tensors + 1)}
    with pytest.raises(LimitExceededError):
        decode_message(frame(header))


def test_max_tensors_accepted() -> None:
    tensors = {f"t{i}": torch.zeros(0) for i in range(DEFAULT_LIMITS.max_tensors)}
    assert len(decode_message(encode_message(Message(tensors))).tensors) == len(tensors)
    with pytest.raises(LimitExceededError):
        encode_message(Message({**tensors, "one_more": torch.zeros(1)}))


def test_too_many_dims(no_tensor_allocation: None) -> None:
    with pytest.raises(LimitExceededError):
        decode_message(frame({"x": spec("F32", [1] * 5, [0, 4])}, b"\0" * 4))
    with pytest.raises(LimitExceededError):
        encode_message(Message({"x": torch.zeros([1] * 5)}))


@pytest.mark.parametrize("dtype", ["F64", "U8", "I8", "I16", "F8_E4M3", "f32", ""])
def test_disallowed_dtype(dtype: str, no_tensor_allocation: None) -> None:
    with pytest.raises(ProtocolError, match="dtype"):
        decode_message(frame({"x": spec(dtype, [1], [0, 8])}, b"\0" * 8))


def test_dtype_outside_configured_allow_list() -> None:
    blob = encode_message(Message({"x": torch.zeros(2, dtype=torch.int64)}))
    with pytest.raises(ProtocolError, match="not allowed"):
        decode_message(blob, Limits(allowed_dtypes=frozenset({"F32"})))


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8, torch.int8, torch.complex64])
def test_encode_refuses_unsupported_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(ProtocolError):
        encode_message(Message({"x": torch.zeros(2, dtype=dtype)}))


@pytest.mark.parametrize("code", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_rejected(code: str, bad: float) -> None:
    dtype = DTYPES[code]
    t = torch.tensor([1.0, bad, 2.0]).to(dtype)
    body = t.view(torch.uint8).numpy().tobytes()
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        decode_message(frame({"x": spec(code, [3], [0, len(body)])}, body))
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        encode_message(Message({"x": t}))


def test_overflow_to_inf_is_refused_by_encoder() -> None:
    with pytest.raises(ProtocolError):
        encode_message(Message({"x": torch.tensor([1e39]).to(torch.float16)}))


@pytest.mark.parametrize(
    ("offsets", "body_len"),
    [
        ([[0, 4], [0, 4]], 4),  # overlap
        ([[0, 4], [2, 6]], 8),  # partial overlap
        ([[0, 4], [8, 12]], 12),  # gap
        ([[4, 8], [8, 12]], 12),  # gap at the start
        ([[0, 4], [4, 8]], 12),  # trailing bytes
        ([[0, 4], [4, 8]], 6),  # past the end
        ([[0, 5], [5, 9]], 9),  # length does not match shape
        ([[4, 0], [0, 4]], 8),  # reversed
        ([[-4, 0], [0, 4]], 8),  # negative
    ],
)
def test_bad_data_offsets(offsets: list[list[int]], body_len: int) -> None:
    header = {"a": spec("F32", [1], offsets[0]), "b": spec("F32", [1], offsets[1])}
    with pytest.raises(ProtocolError):
        decode_message(frame(header, b"\0" * body_len))


def test_empty_tensor_inside_another_is_refused() -> None:
    header = {"a": spec("F32", [2], [0, 8]), "b": spec("F32", [0], [4, 4])}
    with pytest.raises(ProtocolError, match="overlaps"):
        decode_message(frame(header, b"\0" * 8))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        b'{"__metadata__":{"k":"1","k":"2"}}',
        b'{"__metadata__":{},"__metadata__":{}}',
    ],
)
def test_duplicate_json_keys(raw: bytes) -> None:
    with pytest.raises(ProtocolError, match="duplicate"):
        decode_message(frame(raw, b"\0" * 4 if b"data_offsets" in raw else b""))


@pytest.mark.parametrize("meta", [{"k": 1}, {"k": None}, {"k": ["v"]}, {"k": {"a": "b"}}, [], "x"])
def test_non_string_metadata(meta: object) -> None:
    with pytest.raises(ProtocolError):
        decode_message(frame({"__metadata__": meta}))


def test_metadata_limits() -> None:
    many = {str(i): "v" for i in range(DEFAULT_LIMITS.max_meta_entries + 1)}
    with pytest.raises(LimitExceededError):
        decode_message(frame({"__metadata__": many}))
    with pytest.raises(LimitExceededError):
        encode_message(Message(meta=many))
    long_value = {"k": "v" * (DEFAULT_LIMITS.max_meta_value_chars + 1)}
    with pytest.raises(LimitExceededError):
        decode_message(frame({"__metadata__": long_value}))
    with pytest.raises(LimitExceededError):
        decode_message(frame({"__metadata__": {"k" * 129: "v"}}))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'"x"',
        b"null",
        b"\xff\xfe{}",
        b"{" * 50_000,
        b"[" * 50_000,
        b'{"x": NaN}',
        b'{"x":' + b"1" * 5000 + b"}",  # past Python's int-from-string limit
        b'{"x":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}',
    ],
)
def test_malformed_header(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(frame(raw))


@pytest.mark.parametrize(
    "bad_spec",
    [
        {"dtype": "F32", "shape": [1]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1},
        spec("F32", [True], [0, 4]),
        spec("F32", [1.0], [0, 4]),
        spec("F32", [-1], [0, 4]),
        spec("F32", "1", [0, 4]),
        spec("F32", [1], [0, 4, 8]),
        spec("F32", [1], [0.0, 4.0]),
        spec("F32", [1], [False, 4]),
        spec(["F32"], [1], [0, 4]),
        "F32",
        None,
    ],
)
def test_malformed_tensor_spec(bad_spec: object) -> None:
    with pytest.raises(ProtocolError):
        decode_message(frame({"x": bad_spec}, b"\0" * 4))


def test_long_tensor_name() -> None:
    with pytest.raises(ProtocolError):
        decode_message(frame({"x" * 129: spec("F32", [0], [0, 0])}))


@pytest.mark.parametrize("meta", [{1: "v"}, {"k": 1}, {"k": None}, {"k": b"v"}, {("k",): "v"}])
def test_encode_refuses_non_string_metadata(meta: dict) -> None:
    with pytest.raises(ProtocolError, match="strings"):
        encode_message(Message(meta=meta))


# --------------------------------------------------------------------------- framing


class FakeStream:
    """An in-memory stream whose reads return chunks of the given sizes (cycled)."""

    def __init__(
        self,
        data: bytes = b"",
        chunk_sizes: list[int] | None = None,
        eof_error: type[Exception] | None = None,
    ) -> None:
        self.data = data
        self.pos = 0
        self.chunk_sizes = chunk_sizes or [1 << 30]
        self.reads = 0
        self.eof_error = eof_error
        self.written: list[bytes] = []

    async def read(self, n: int | None = -1) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.pos >= len(self.data) and self.eof_error is not None:
            raise self.eof_error("eof")
        size = self.chunk_sizes[self.reads % len(self.chunk_sizes)]
        self.reads += 1
        if n is not None and n >= 0:
            size = min(size, n)
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        return chunk

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written.append(bytes(data))
        self.data += data


async def _read_all_frames(stream: FakeStream, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    frames = []
    while True:
        try:
            frames.append(await read_frame(stream, limits))
        except StreamClosed:
            return frames


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=6),
    chunk_sizes=st.lists(st.integers(1, 64), min_size=1, max_size=10),
)
def test_read_frame_reassembles(payloads: list[bytes], chunk_sizes: list[int]) -> None:
    async def main() -> None:
        writer = FakeStream()
        for p in payloads:
            await write_frame(writer, p)
        reader = FakeStream(writer.data, chunk_sizes)
        assert await _read_all_frames(reader) == payloads
        assert reader.pos == len(writer.data)

    trio.run(main)


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=100), min_size=1, max_size=4),
    chunk_sizes=st.lists(st.integers(1, 32), min_size=1, max_size=6),
    data=st.data(),
    eof_error=st.sampled_from([None, ConnectionResetError, EOFError]),
)
def test_eof_inside_or_between_frames(
    payloads: list[bytes],
    chunk_sizes: list[int],
    data: st.DataObject,
    eof_error: type[Exception] | None,
) -> None:
    wire = b"".join(struct.pack("!I", len(p)) + p for p in payloads)
    boundaries = {0}
    offset = 0
    for p in payloads:
        offset += 4 + len(p)
        boundaries.add(offset)
    cut = data.draw(st.integers(0, len(wire) - 1))

    async def main() -> None:
        reader = FakeStream(wire[:cut], chunk_sizes, eof_error)
        complete = [
            p for p, end in zip(payloads, sorted(boundaries)[1:], strict=True) if end <= cut
        ]
        got = []
        with pytest.raises(ProtocolError) as info:
            while True:
                got.append(await read_frame(reader))
        assert got == complete
        assert isinstance(info.value, StreamClosed) == (cut in boundaries)

    trio.run(main)


def test_length_over_limit_fails_before_reading_body() -> None:
    async def main() -> None:
        limits = Limits(max_frame_bytes=100)
        stream = FakeStream(struct.pack("!I", 101) + b"x" * 101)
        with pytest.raises(LimitExceededError):
            await read_frame(stream, limits)
        assert stream.pos == 4
        stream = FakeStream(struct.pack("!I", 2**32 - 1))  # no body at all
        with pytest.raises(LimitExceededError):
            await read_frame(stream)
        assert stream.pos == 4
        assert (
            await read_frame(FakeStream(struct.pack("!I", 100) + b"y" * 100), limits) == b"y" * 100
        )

    trio.run(main)


def test_empty_frame_and_empty_stream() -> None:
    async def main() -> None:
        assert await read_frame(FakeStream(b"\0\0\0\0")) == b""
        with pytest.raises(StreamClosed):
            await read_frame(FakeStream(b""))
        with pytest.raises(StreamClosed):
            await read_frame(FakeStream(b"", eof_error=ConnectionResetError))
        with pytest.raises(ProtocolError) as info:
            await read_frame(FakeStream(b"\0\0"))
        assert not isinstance(info.value, StreamClosed)
        with pytest.raises(ProtocolError):  # an empty frame is not a message
            await receive_message(FakeStream(b"\0\0\0\0"))

    trio.run(main)


def test_large_frame_is_written_in_chunks() -> None:
    async def main() -> None:
        payload = bytes(range(256)) * (10 * 1024)  # 2.5 MiB
        stream = FakeStream()
        await write_frame(stream, payload)
        assert len(stream.written) == 3
        assert all(len(w) <= framing._WRITE_CHUNK + 4 for w in stream.written)
        assert await read_frame(FakeStream(stream.data, [4096, 17, 100_000])) == payload

    trio.run(main)


@settings(max_examples=30, deadline=None)
@given(
    tensors=tensors_st(max_tensors=3),
    meta=meta_st,
    chunk_sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5),
)
def test_send_receive_message(tensors: dict, meta: dict, chunk_sizes: list[int]) -> None:
    async def main() -> None:
        writer = FakeStream()
        sent = await send_message(writer, Message(tensors, meta))
        message, raw = await receive_message(FakeStream(writer.data, chunk_sizes))
        assert raw == sent
        assert_same_tensors(message.tensors, tensors)
        assert message.meta == meta

    trio.run(main)


# --------------------------------------------------------------------------- error frames


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_error_frame_round_trip(code: str) -> None:
    wire = decode_message(encode_message(error_message(code, "went wrong")))
    with pytest.raises(RemoteError) as info:
        raise_if_error(wire)
    assert info.value.code == code
    assert info.value.message == "went wrong"


@settings(max_examples=50, deadline=None)
@given(
    code=st.text(max_size=30).filter(lambda c: c not in ERROR_CODES), text=st.text(max_size=3000)
)
def test_unknown_error_code_maps_to_internal(code: str, text: str) -> None:
    wire = decode_message(encode_message(Message(meta={"error": code, "message": text})))
    with pytest.raises(RemoteError) as info:
        raise_if_error(wire)
    assert info.value.code == INTERNAL
    assert info.value.message == text[:2000]
    assert info.value.retriable_elsewhere


def test_error_message_truncates_and_non_errors_pass_through() -> None:
    assert len(error_message("busy", "x" * 5000).meta["message"]) == 2000
    plain = Message({"x": torch.zeros(1)}, {"k": "v"})
    assert raise_if_error(plain) is plain
    with pytest.raises(RemoteError) as info:
        raise_if_error(Message(meta={"error": "bad_request"}))
    assert info.value.message == "" and not info.value.retriable_elsewhere
