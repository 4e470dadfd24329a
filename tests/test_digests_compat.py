"""Output digests are signed: every peer, old or new, must compute them byte for byte
alike. The digest's definition written out here (the spec), against the implementation,
over every wire dtype, empty and non-contiguous tensors; and one known answer."""

from __future__ import annotations

import hashlib
import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.protocol.codec import TORCH_DTYPES, Message, decode_message, encode_message
from trustswarm.protocol.digests import bytes_digest, tensors_digest


def spec_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a domain line, then per tensor in name order a JSON line [name, dtype,
    shape, byte length] and its raw little-endian bytes in C order."""
    h = hashlib.sha256(b"trustswarm-tensors-v2\n")
    for name in sorted(tensors):
        t = tensors[name]
        data = bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""
        h.update(json.dumps([name, str(t.dtype), list(t.shape), len(data)]).encode() + b"\n")
        h.update(data)
    return h.hexdigest()


@st.composite
def tensor_sets(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    out = {}
    for name in draw(st.lists(st.text(max_size=6), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(list(TORCH_DTYPES.values())))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        t = (torch.randn(shape) * 50).to(dtype) if shape or draw(st.booleans()) else torch.tensor(3)
        if t.dim() >= 2 and draw(st.booleans()):
            t = t.transpose(0, 1)  # non-contiguous: the digest covers the values in C order
        out[name] = t.to(dtype)
    return out


@settings(max_examples=80, deadline=None)
@given(tensor_sets())
def test_tensors_digest_matches_its_definition(tensors: dict[str, torch.Tensor]):
    assert tensors_digest(tensors) == spec_digest(tensors)
    # what a peer decodes from the wire digests as what was sent
    wire = decode_message(encode_message(Message(tensors))).tensors
    assert tensors_digest(wire) == tensors_digest(tensors)


def test_known_answers():
    tensors = {
        "hidden_states": torch.arange(6, dtype=torch.float32).reshape(1, 2, 3),
        "ids": torch.tensor([1, 2]),
        "e": torch.zeros(0, 2, dtype=torch.bfloat16),
    }
    assert tensors_digest(tensors) == (
        "8950ec4bbff981a0b1c783b2c75ea12f90d8bc63ea76e32387711ae70dd87e22"
    )
    assert bytes_digest(b"") == hashlib.sha256(b"").hexdigest()
