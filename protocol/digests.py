"""Content digests used in signed statements."""

from __future__ import annotations

import hashlib

import torch


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over name, dtype, shape and raw bytes of each tensor, in name order."""
    h = hashlib.sha256(b"trustswarm-tensors-v1\n")
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
