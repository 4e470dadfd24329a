"""Content digests used in signed statements."""

from __future__ import annotations

import hashlib
import json

import torch


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over name, dtype, shape and raw bytes of each tensor, in name order.

    Each tensor's description is a JSON line with its byte length, so no choice of
    names or shapes can make two different tensor sets hash alike."""
    h = hashlib.sha256(b"trustswarm-tensors-v2\n")
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        # The tensor's own memory, not a copy of it (hashlib reads any contiguous buffer).
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        h.update(json.dumps([name, str(t.dtype), list(t.shape), len(data)]).encode() + b"\n")
        h.update(data)
    return h.hexdigest()
