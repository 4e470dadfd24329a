"""Chain frames and forwarded inputs (protocol/chained.py), without a network: the
parser refuses every malformed header with a ProtocolError, splicing gives the request
the client would send, a hop takes a forwarded input only as the named upstream signed it."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.protocol.chained import (
    MAGIC,
    ChainFrame,
    Downstream,
    Expected,
    Upstream,
    check_forwarded,
    encode_chain_frame,
    parse_chain_frame,
    splice_hidden,
)
from trustswarm.protocol.codec import Message, encode_message
from trustswarm.protocol.digests import tensors_digest
from trustswarm.protocol.errors import ProtocolError, SignatureError
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.sessions import new_client_part, new_server_nonce, session_id_of
from trustswarm.protocol.statement import Statement, sign_statement

# -- the chain frame parser ---------------------------------------------------------

_PEER = str(Identity.generate().peer_id)
_SESSION = session_id_of(new_client_part(), new_server_nonce())
_TEMPLATE = encode_message(
    Message({"hidden_states": torch.zeros(1, 1, 8)}, {"session_id": _SESSION, "step": "3"})
)


def _header(wait: object = 1.0, upstream: object = None, nxt: object = None) -> dict:
    return {"wait": wait, "upstream": upstream, "next": nxt}


def _frame(header: object, request: bytes = _TEMPLATE) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return MAGIC + struct.pack(">I", len(raw)) + raw + request


def test_chain_frames_round_trip():
    up = Upstream(_PEER, _SESSION, 2)
    down = Downstream(_PEER, ("/ip4/127.0.0.1/tcp/1",), _SESSION, 0)
    frame = ChainFrame(2.5, up, down, _TEMPLATE)
    parsed = parse_chain_frame(encode_chain_frame(frame))
    assert parsed == dataclasses.replace(frame, shape=(1, 1, 8))
    # The encoder refuses what a hop would refuse (the client never gets a hop banned
    # for a frame of its own making).
    for bad in [
        dataclasses.replace(frame, wait=float("nan")),
        dataclasses.replace(frame, next=dataclasses.replace(down, addrs=())),
        dataclasses.replace(frame, upstream=dataclasses.replace(up, peer="nobody")),
        dataclasses.replace(frame, upstream=dataclasses.replace(up, step=-1)),
    ]:
        with pytest.raises(ProtocolError):
            encode_chain_frame(bad)


_bad_numbers = st.one_of(
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0, -1, -0.5, 10.01, 1e308]),
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
_links = st.fixed_dictionaries(
    {
        "peer": st.one_of(st.just(_PEER), st.text(max_size=60)),
        "session_id": st.one_of(st.just(_SESSION), st.text(max_size=60)),
        "step": st.one_of(st.integers(-(2**63), 2**63), st.just(1)),
    }
)


@settings(max_examples=200, deadline=None)
@given(
    header=st.one_of(
        st.builds(_header, wait=_bad_numbers),
        st.builds(_header, upstream=st.one_of(_links, st.integers(), st.text(max_size=9))),
        st.builds(
            _header,
            nxt=st.one_of(
                _links.map(lambda d: {**d, "addrs": ["/ip4/127.0.0.1/tcp/1"]}),
                st.builds(
                    lambda a: {"peer": _PEER, "session_id": _SESSION, "step": 0, "addrs": a},
                    st.one_of(
                        st.lists(st.text(max_size=300), max_size=10),
                        st.just(["x" * 257]),
                        st.just([]),
                        st.just(["a"] * 9),
                        st.integers(),
                    ),
                ),
            ),
        ),
        st.dictionaries(st.text(max_size=8), st.integers(), max_size=4),
        st.binary(max_size=64),
        st.just(b"[" * 5000 + b"]" * 5000),
        st.just(b'{"wait": 1, "upstream": null, "next": null, "x": "' + b"y" * 20000 + b'"}'),
    ),
    request=st.one_of(st.just(_TEMPLATE), st.binary(max_size=64)),
)
def test_malformed_chain_frames_raise_protocol_error(header, request):
    try:
        frame = parse_chain_frame(_frame(header, request))
    except ProtocolError:
        return
    # Only a well-formed header with a decodable request parses.
    assert 0 < frame.wait <= 10 and frame.request == _TEMPLATE


@settings(max_examples=50, deadline=None)
@given(cut=st.integers(0, 40))
def test_truncated_chain_frames_raise_protocol_error(cut):
    raw = encode_chain_frame(ChainFrame(1.0, Upstream(_PEER, _SESSION, 1), None, _TEMPLATE))
    with pytest.raises(ProtocolError):
        parse_chain_frame(raw[: len(MAGIC) + cut])


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=8, max_size=8),
    bad=st.sampled_from([None, float("nan"), float("inf")]),
)
def test_splicing_gives_the_request_the_client_would_send(values, bad):
    hidden = torch.tensor(values, dtype=torch.float32).reshape(1, 1, 8)
    expected = encode_message(
        Message({"hidden_states": hidden}, {"session_id": _SESSION, "step": "3"})
    )
    assert splice_hidden(_TEMPLATE, hidden) == expected
    assert splice_hidden(_TEMPLATE, hidden.bfloat16()) == splice_hidden(
        _TEMPLATE, hidden.bfloat16().float()
    )
    if bad is not None:
        hidden[0, 0, 3] = bad
        with pytest.raises(ProtocolError):
            splice_hidden(_TEMPLATE, hidden)
    with pytest.raises(ProtocolError):
        splice_hidden(_TEMPLATE, torch.zeros(1, 2, 8))


# -- what a hop takes as its input -----------------------------------------------------

_UP = Identity.generate()
_OUTPUT = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(0))


def _forwarded(output: torch.Tensor = _OUTPUT, signer: Identity = _UP, **changes) -> Message:
    fields = {
        "kind": "inference",
        "server_peer_id": str(_UP.peer_id),
        "model_id": "tiny",
        "start": 0,
        "end": 2,
        "weights_digest": "a" * 64,
        "request_digest": "b" * 64,
        "output_digest": tensors_digest({"hidden_states": _OUTPUT}),
        "session_id": _SESSION,
        "step": 3,
        "chain": "c" * 64,
        "dtype": "float32",
        "timestamp": 1.0,
    }
    statement = Statement(**{**fields, **changes})
    meta = {**sign_statement(signer, statement).to_meta(), "to_session": "s"}
    return Message({"hidden_states": output}, meta)


_EXPECTED = Expected(Upstream(str(_UP.peer_id), _SESSION, 3), 2, (1, 1, 8))


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(
        [
            {"kind": "forward"},
            "another server's statement",
            {"session_id": session_id_of(new_client_part(), new_server_nonce())},
            {"step": 2},
            {"model_id": "other"},
            {"end": 3},
            {"output_digest": "d" * 64},
            {"dtype": "bfloat16"},
            "other signer",
            "other sender",
            "other tensor",
            "other shape",
            "extra field",
        ]
    )
)
def test_a_forwarded_input_is_taken_only_as_the_named_upstream_signed_it(case):
    assert torch.equal(check_forwarded(_forwarded(), _EXPECTED, str(_UP.peer_id), "tiny"), _OUTPUT)
    sender = str(_UP.peer_id)
    if case == "other signer":  # the signature of another statement
        message = _forwarded()
        other = _forwarded(step=4).meta["signature"]
        message = Message(message.tensors, {**message.meta, "signature": other})
    elif case == "another server's statement":
        other = Identity.generate()
        message = _forwarded(signer=other, server_peer_id=str(other.peer_id))
    elif case == "other sender":
        message, sender = _forwarded(), str(Identity.generate().peer_id)
    elif case == "other tensor":
        message = _forwarded(output=_OUTPUT + 1e-3)
    elif case == "other shape":
        wide = torch.zeros(1, 2, 8)
        digest = tensors_digest({"hidden_states": wide})
        message = _forwarded(output=wide, output_digest=digest)
    elif case == "extra field":
        message = _forwarded()
        message = Message(message.tensors, {**message.meta, "x": "1"})
    else:
        message = _forwarded(**case)
    with pytest.raises((ProtocolError, SignatureError)):
        check_forwarded(message, _EXPECTED, sender, "tiny")
