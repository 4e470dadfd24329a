"""Messages: tensors plus a string metadata map, encoded as one safetensors blob.

Decoding parses the safetensors header ourselves and checks every limit before a
byte of tensor data is copied, so a hostile frame cannot make us allocate more
than the frame it already fits in.

Encoding writes the safetensors layout ourselves too, canonically: metadata keys in
sorted order, tensors in safetensors' own order (widest dtype first, then name), the
header padded with spaces to 8 bytes. The same message is the same bytes in every
process (the `safetensors` package writes metadata in hash-map order, which changes
from one process to the next), and the encoder checks the limits on the header it
builds with the decoder's own functions instead of parsing its output again.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import LimitExceededError, ProtocolError
from .limits import DEFAULT_LIMITS, WIRE_DTYPES, Limits

# safetensors dtype code -> torch dtype, for every code on the wire allow-list.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "BOOL": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as statements and announcements name it: "float32", "bfloat16"."""
    return str(dtype).removeprefix("torch.")


_FLOAT_CODES = frozenset({"F32", "BF16", "F16"})
_HEADER_LEN = struct.Struct("<Q")
_WIRE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in TORCH_DTYPES.items()}
# safetensors' Dtype enum order; it lays tensors out by it, descending, then by name,
# so that every tensor's data starts aligned to its own item size.
_LAYOUT_RANK = {"BOOL": 0, "F16": 1, "BF16": 2, "I32": 3, "F32": 4, "I64": 5}
_METADATA = "__metadata__"


@dataclass(frozen=True)
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ProtocolError(f"message has no tensor {name!r}") from None

    def optional_tensor(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def field(self, name: str) -> str:
        try:
            return self.meta[name]
        except KeyError:
            raise ProtocolError(f"message has no metadata field {name!r}") from None

    def int_field(self, name: str, *, low: int = 0, high: int = 2**62) -> int:
        raw = self.field(name)
        if not raw.isascii() or not raw.lstrip("-").isdigit() or len(raw) > 20:
            raise ProtocolError(f"metadata field {name!r} is not an integer: {raw[:40]!r}")
        value = int(raw)
        if not low <= value <= high:
            raise ProtocolError(f"metadata field {name!r}={value} is outside [{low}, {high}]")
        return value


def encode_message(message: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode a message canonically; refuses to produce anything its own decoder would
    reject (the limits are checked by the decoder's functions on the header built here)."""
    if sys.byteorder != "little":  # safetensors is little-endian; we write raw memory
        raise ProtocolError("the wire format is little-endian; this machine is not")
    for name, value in message.meta.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ProtocolError("metadata keys and values must be strings")
    meta = _parse_meta(message.meta, limits)
    header: dict[str, object] = {_METADATA: dict(sorted(meta.items()))} if meta else {}
    chunks: list[bytes | memoryview] = []
    offset = 0
    for name, tensor in sorted(message.tensors.items(), key=_layout_key):
        code, data = _wire_data(name, tensor)
        header[name] = {
            "dtype": code,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    specs = {k: v for k, v in header.items() if k != _METADATA}
    _parse_tensor_specs(specs, limits, offset)
    try:
        raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate in a name or value
        raise ProtocolError("metadata and tensor names must be valid unicode") from None
    raw += b" " * (-len(raw) % 8)
    if len(raw) > limits.max_header_bytes:
        raise LimitExceededError(f"header of {len(raw)} bytes exceeds {limits.max_header_bytes}")
    if _HEADER_LEN.size + len(raw) + offset > limits.max_frame_bytes:
        raise LimitExceededError(f"message exceeds {limits.max_frame_bytes} bytes")
    return b"".join([_HEADER_LEN.pack(len(raw)), raw, *chunks])


def _layout_key(item: tuple[object, torch.Tensor]) -> tuple[int, str]:
    name, tensor = item
    if not isinstance(name, str) or name == _METADATA:
        raise ProtocolError(f"tensor names must be strings other than {_METADATA!r}")
    if not isinstance(tensor, torch.Tensor):
        raise ProtocolError(f"tensor {name[:40]!r} is not a tensor")
    code = _WIRE_CODES.get(tensor.dtype)
    if code is None:
        raise ProtocolError(f"tensor {name[:40]!r} has dtype {tensor.dtype}, not a wire dtype")
    return -_LAYOUT_RANK[code], name


def _wire_data(name: str, tensor: torch.Tensor) -> tuple[str, memoryview]:
    """A tensor's wire dtype code and its raw little-endian bytes (a view, not a copy
    when the tensor is already a contiguous CPU tensor). Refuses NaN and Inf."""
    code = _WIRE_CODES[tensor.dtype]
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if not flat.numel():
        return code, memoryview(b"")
    if code in _FLOAT_CODES and not _all_finite(code, flat):
        raise ProtocolError(f"tensor {name[:40]!r} contains NaN or Inf")
    return code, memoryview(flat.view(torch.uint8).numpy())


def _all_finite(code: str, flat: torch.Tensor) -> bool:
    """No NaN or Inf in a flat float tensor. numpy, not torch: a small torch op costs
    tens of microseconds of dispatch (more when its thread pool is contended)."""
    if code == "BF16":  # numpy has no bfloat16: NaN and Inf are the all-ones exponent
        bits = flat.view(torch.int16).numpy()
        return not bool(((bits & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(flat.numpy()).all())


def decode_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode and validate one message. Raises ProtocolError / LimitExceededError."""
    meta, specs, body_start = _check_structure(data, limits)
    tensors: dict[str, torch.Tensor] = {}
    for name, (code, shape, begin, end) in specs.items():
        if end == begin:
            tensor = torch.empty(shape, dtype=TORCH_DTYPES[code])
        else:
            buf = bytearray(memoryview(data)[body_start + begin : body_start + end])
            tensor = torch.frombuffer(buf, dtype=TORCH_DTYPES[code]).reshape(shape)
        if code in _FLOAT_CODES and tensor.numel() and not _all_finite(code, tensor.reshape(-1)):
            raise ProtocolError(f"tensor {name!r} contains NaN or Inf")
        tensors[name] = tensor
    return Message(tensors=tensors, meta=meta)


def _check_structure(
    data: bytes, limits: Limits
) -> tuple[dict[str, str], dict[str, tuple[str, list[int], int, int]], int]:
    if len(data) > limits.max_frame_bytes:
        raise LimitExceededError(f"message of {len(data)} bytes exceeds {limits.max_frame_bytes}")
    if len(data) < _HEADER_LEN.size:
        raise ProtocolError("message shorter than its header length field")
    (header_len,) = _HEADER_LEN.unpack_from(data, 0)
    if header_len > limits.max_header_bytes:
        raise LimitExceededError(f"header of {header_len} bytes exceeds {limits.max_header_bytes}")
    body_start = _HEADER_LEN.size + header_len
    if body_start > len(data):
        raise ProtocolError("header length points past the end of the message")
    header = _parse_header(bytes(data[_HEADER_LEN.size : body_start]))
    meta = _parse_meta(header.pop("__metadata__", {}), limits)
    specs = _parse_tensor_specs(header, limits, len(data) - body_start)
    return meta, specs, body_start


def _parse_header(raw: bytes) -> dict:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise ProtocolError(f"duplicate key {key!r} in header")
            out[key] = value
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:  # incl. ints past Python's digit limit
        raise ProtocolError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    return header


def _parse_meta(meta: object, limits: Limits) -> dict[str, str]:
    if not isinstance(meta, dict):
        raise ProtocolError("__metadata__ is not an object")
    if len(meta) > limits.max_meta_entries:
        raise LimitExceededError(f"{len(meta)} metadata entries exceed {limits.max_meta_entries}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise ProtocolError(f"metadata value of {key!r} is not a string")
        if len(value) > limits.max_meta_value_chars or len(key) > 128:
            raise LimitExceededError(f"metadata entry {key[:40]!r} is too long")
    return meta


def _parse_tensor_specs(
    header: dict, limits: Limits, body_len: int
) -> dict[str, tuple[str, list[int], int, int]]:
    if len(header) > limits.max_tensors:
        raise LimitExceededError(f"{len(header)} tensors exceed {limits.max_tensors}")
    specs: dict[str, tuple[str, list[int], int, int]] = {}
    total_elements = 0
    for name, spec in header.items():
        if len(name) > 128:
            raise ProtocolError("tensor name too long")
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise ProtocolError(f"tensor {name[:40]!r} has a malformed description")
        code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(code, str) or code not in WIRE_DTYPES:
            raise ProtocolError(f"tensor {name!r} has unknown dtype {str(code)[:20]!r}")
        if code not in limits.allowed_dtypes:
            raise ProtocolError(f"tensor {name!r} has dtype {code}, not allowed here")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise LimitExceededError(f"tensor {name!r} has more than {limits.max_ndim} dims")
        if not all(type(d) is int and 0 <= d <= limits.max_elements for d in shape):
            raise ProtocolError(f"tensor {name!r} has an invalid shape")
        elements = math.prod(shape)
        total_elements += elements
        if total_elements > limits.max_elements:
            raise LimitExceededError(f"message holds more than {limits.max_elements} elements")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise ProtocolError(f"tensor {name!r} has malformed data offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= body_len or end - begin != elements * WIRE_DTYPES[code]:
            raise ProtocolError(f"tensor {name!r} data offsets do not match its shape")
        specs[name] = (code, shape, begin, end)
    # safetensors requires the data to be covered exactly, without gaps or overlap.
    cursor = 0
    for _code, _shape, begin, end in sorted(specs.values(), key=lambda s: (s[2], s[3])):
        if begin != cursor:
            raise ProtocolError("tensor data overlaps or leaves gaps")
        cursor = end
    if cursor != body_len:
        raise ProtocolError("message has trailing bytes after tensor data")
    return specs
