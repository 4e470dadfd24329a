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


# Discovery pages (protocol/discovery.py): one announcement per metadata entry, so at
# most max_meta_entries - 2 records; the records' JSON-escaped text must also fit the
# 64 KiB safetensors header, with room to spare.
DISCOVERY_PAGE_RECORDS = 28
DISCOVERY_PAGE_CHARS = 48 * 1024
# What a client reads of a discover answer: metadata only, and not a 64 MiB frame from a
# hostile peer for a page that is at most ~64 KiB.
DISCOVERY_LIMITS = Limits(max_frame_bytes=80 * 1024, max_tensors=0, max_elements=0)
