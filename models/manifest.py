"""The manifest of a model directory: which files hold which blocks, and their digests.

The manifest is the root of trust for a model directory: every weight file is
named in it together with its sha256, and the model id is derived from those
digests, so two directories with the same id hold byte-identical weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from trustswarm.models.errors import ModelDirError

FORMAT = "trustswarm-model-v1"
SPAN_DOMAIN = b"trustswarm-span-v1"
ID_DOMAIN = b"trustswarm-model-id-v1"
DTYPES = frozenset({"float32", "float16", "bfloat16"})

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MODEL_ID = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._+-]{0,127})@(?P<fp>[0-9a-f]{16})")
_FIELDS = (
    "model_id",
    "architecture",
    "num_blocks",
    "hidden_size",
    "dtype",
    "block_files",
    "block_digests",
    "client_file",
    "client_digest",
)


def sanitize_name(name: str) -> str:
    """Turn a free-form name (file stem, folder name) into a valid model name."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-._+")[:128]
    return cleaned or "model"


def weights_fingerprint(block_digests: list[str], client_digest: str) -> str:
    """16 hex chars: sha256 over ID_DOMAIN, then each block digest, then the client
    digest, each digest as its 32 raw bytes."""
    h = hashlib.sha256(ID_DOMAIN)
    for digest in [*block_digests, client_digest]:
        h.update(bytes.fromhex(digest))
    return h.hexdigest()[:16]


def make_model_id(name: str, block_digests: list[str], client_digest: str) -> str:
    return f"{sanitize_name(name)}@{weights_fingerprint(block_digests, client_digest)}"


def _check_rel_path(value: str, what: str) -> None:
    # Paths come from a file on disk; refuse anything that could escape the directory.
    p = PurePosixPath(value)
    if not value or "\\" in value or p.is_absolute() or ".." in p.parts or "." in p.parts:
        raise ModelDirError(f"manifest: {what} must be a plain relative path, got {value!r}")


@dataclass(frozen=True)
class Manifest:
    model_id: str
    architecture: str
    num_blocks: int
    hidden_size: int
    dtype: str
    block_files: list[str] = field(hash=False)
    block_digests: list[str] = field(hash=False)
    client_file: str
    client_digest: str

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        for name in ("model_id", "architecture", "dtype", "client_file", "client_digest"):
            if not isinstance(getattr(self, name), str):
                raise ModelDirError(f"manifest: {name} must be a string")
        for name in ("num_blocks", "hidden_size"):
            value = getattr(self, name)
            # bool is an int subclass; a JSON `true` is not a block count.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelDirError(f"manifest: {name} must be a positive integer, got {value!r}")
        for name in ("block_files", "block_digests"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ModelDirError(f"manifest: {name} must be a list of strings")
            # Defensive copy: the dataclass is frozen, its lists should not be shared.
            object.__setattr__(self, name, list(value))
            if len(value) != self.num_blocks:
                raise ModelDirError(
                    f"manifest: {name} has {len(value)} entries, expected num_blocks={self.num_blocks}"
                )
        if not self.architecture.isidentifier():
            raise ModelDirError(f"manifest: bad architecture {self.architecture!r}")
        if self.dtype not in DTYPES:
            raise ModelDirError(
                f"manifest: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )
        for digest in [*self.block_digests, self.client_digest]:
            if not _HEX64.fullmatch(digest):
                raise ModelDirError(f"manifest: bad sha256 hex digest {digest!r}")
        files = [*self.block_files, self.client_file]
        for path in files:
            _check_rel_path(path, "file")
        if len(set(files)) != len(files):
            raise ModelDirError("manifest: file names must be distinct")
        m = _MODEL_ID.fullmatch(self.model_id)
        if m is None:
            raise ModelDirError(
                f"manifest: model_id must look like NAME@16hex, got {self.model_id!r}"
            )
        if m["fp"] != weights_fingerprint(self.block_digests, self.client_digest):
            raise ModelDirError("manifest: model_id does not match the weight digests")

    @property
    def name(self) -> str:
        return self.model_id.split("@", 1)[0]

    def span_digest(self, start: int, end: int) -> str:
        """The "weights digest" of blocks [start, end), as sha256 hex over:

            b"trustswarm-span-v1"
            start  as 4-byte big-endian unsigned
            end    as 4-byte big-endian unsigned
            block_digests[start:end], each as its 32 raw bytes, in order

        Clients and servers both compute it, so they agree on which weights answered.
        """
        if not (0 <= start < end <= self.num_blocks):
            raise ModelDirError(f"bad span [{start}, {end}) for {self.num_blocks} blocks")
        h = hashlib.sha256(SPAN_DOMAIN)
        h.update(start.to_bytes(4, "big"))
        h.update(end.to_bytes(4, "big"))
        for digest in self.block_digests[start:end]:
            h.update(bytes.fromhex(digest))
        return h.hexdigest()

    def to_json(self) -> str:
        data: dict[str, Any] = {"format": FORMAT}
        for name in _FIELDS:
            value = getattr(self, name)
            data[name] = list(value) if isinstance(value, list) else value
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelDirError(f"manifest: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ModelDirError("manifest: top level must be a JSON object")
        if data.get("format") != FORMAT:
            raise ModelDirError(f"manifest: format must be {FORMAT!r}, got {data.get('format')!r}")
        expected = {"format", *_FIELDS}
        if set(data) != expected:
            missing = sorted(expected - set(data))
            extra = sorted(set(data) - expected)
            raise ModelDirError(f"manifest: missing fields {missing}, unknown fields {extra}")
        return cls(**{name: data[name] for name in _FIELDS})
