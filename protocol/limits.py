"""Limits on what a peer may send, checked before anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass, field

# safetensors dtype names we accept on the wire; everything else is refused.
WIRE_DTYPES: dict[str, int] = {
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "BOOL": 1,
}


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_tensors: int = 8
    max_ndim: int = 4
    max_elements: int = 16 * 1024 * 1024
    max_meta_entries: int = 32
    max_meta_value_chars: int = 16 * 1024
    allowed_dtypes: frozenset[str] = field(default_factory=lambda: frozenset(WIRE_DTYPES))


DEFAULT_LIMITS = Limits()
