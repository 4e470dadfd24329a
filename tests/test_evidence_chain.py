"""Session ids and the session hash chain (protocol/sessions.py), and what Evidence.open
accepts: one server's session, contiguous from step 0, every link matching. Everything
else (spliced, reordered, shortened, mixed, relinked, mistyped) is an EvidenceError."""

from __future__ import annotations

import dataclasses
import re
import time
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.protocol.codec import Message, decode_message, encode_message
from trustswarm.protocol.digests import bytes_digest, tensors_digest
from trustswarm.protocol.errors import ProtocolError
from trustswarm.protocol.evidence import Evidence, EvidenceError, SignedExchange
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.sessions import (
    SessionChain,
    check_client_part,
    check_server_nonce,
    first_link,
    new_client_part,
    new_server_nonce,
    next_link,
    session_id_of,
)
from trustswarm.protocol.statement import SignedStatement, Statement, sign_statement

SETTINGS = settings(max_examples=150, deadline=None)
A = Identity.generate()
B = Identity.generate()
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


# -- building genuine transcripts -------------------------------------------------------


def _statement(identity: Identity, chain: SessionChain, request: bytes, output: dict) -> Statement:
    return Statement(
        kind="inference",
        server_peer_id=str(identity.peer_id),
        model_id="tiny",
        start=0,
        end=6,
        weights_digest="a" * 64,
        request_digest=bytes_digest(request),
        output_digest=tensors_digest(output),
        session_id=chain.session_id,
        step=chain.step,
        chain=chain.link,
        dtype="float32",
        timestamp=time.time(),
    )


def signed_step(
    identity: Identity, chain: SessionChain, seed: int, dtype: torch.dtype = torch.float32
) -> SignedExchange:
    """One step as an honest server answers it (advances `chain`)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = 3 if chain.step == 0 else 1  # a prefill of 3 tokens, then 1 token per step
    hidden = torch.randn(1, tokens, 4, generator=gen)
    request = encode_message(
        Message(
            {"hidden_states": hidden}, {"session_id": chain.session_id, "step": str(chain.step)}
        )
    )
    output = {"hidden_states": (hidden * 2).to(dtype)}
    statement = _statement(identity, chain, request, output)
    answer = Message(output, sign_statement(identity, statement).to_meta())
    chain.advance(statement)
    return SignedExchange(request, encode_message(answer))


def transcript(identity: Identity, session_id: str, steps: int, seed: int) -> list[SignedExchange]:
    chain = SessionChain(session_id)
    return [signed_step(identity, chain, seed * 100 + i) for i in range(steps)]


SID = "client01." + "0" * 32


@cache
def pool() -> dict[str, list[SignedExchange]]:
    """Four genuine sessions of 4 steps. `a` and `b`: one server, one session id (as if
    the server had drawn the same nonce twice, the case only the chain stops), other
    prompts of equal length. `c`: another server, same id. `d`: same server, another id."""
    return {
        "a": transcript(A, SID, 4, 1),
        "b": transcript(A, SID, 4, 2),
        "c": transcript(B, SID, 4, 3),
        "d": transcript(A, "client01." + "1" * 32, 4, 4),
    }


def steps_of(evidence: Evidence) -> list[int]:
    return [o.statement.step for o in evidence.open()]


# -- Evidence.open ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
def test_genuine_transcripts_and_their_prefixes_open(name: str) -> None:
    exchanges = pool()[name]
    for n in range(1, len(exchanges) + 1):
        assert steps_of(Evidence(tuple(exchanges[:n]))) == list(range(n))


@SETTINGS
@given(
    picks=st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 3)), min_size=1, max_size=6)
)
def test_open_accepts_exactly_the_prefixes_of_one_real_session(picks: list) -> None:
    """Any sequence of genuinely signed steps drawn from the pool (splices of sessions
    with the same id, reordered, repeated or dropped steps, two servers' steps) opens
    only when it is steps 0..n of one real session."""
    exchanges = tuple(pool()[name][i] for name, i in picks)
    names = {name for name, _ in picks}
    genuine = len(names) == 1 and [i for _, i in picks] == list(range(len(picks)))
    if genuine:
        assert steps_of(Evidence(exchanges)) == list(range(len(picks)))
    else:
        with pytest.raises(EvidenceError):
            Evidence(exchanges).open()


def test_the_measured_splice_is_rejected_by_the_chain() -> None:
    """Step 0 of one run and step 1 of another, same server, same session id, prompts
    of equal length: every signature and digest is genuine; only the chain tells."""
    a, b = pool()["a"], pool()["b"]
    with pytest.raises(EvidenceError, match="not chained"):
        Evidence((a[0], b[1])).open()
    with pytest.raises(EvidenceError, match="not chained"):
        Evidence((b[0], b[1], a[2])).open()


@pytest.mark.parametrize(
    ("picks", "match"),
    [
        ([("a", 1), ("a", 0)], "step 1"),  # reordered
        ([("a", 0), ("a", 2)], "step 2"),  # a middle step dropped
        ([("a", 1)], "step 1"),  # not from step 0
        ([("a", 0), ("a", 0)], "step 0"),  # repeated
        ([("a", 0), ("c", 1)], "one server"),  # two servers
        ([("a", 0), ("d", 1)], "one server"),  # two sessions
    ],
)
def test_non_contiguous_or_mixed_transcripts(picks: list, match: str) -> None:
    exchanges = tuple(pool()[name][i] for name, i in picks)
    with pytest.raises(EvidenceError, match=match):
        Evidence(exchanges).open()


def _resigned(exchange: SignedExchange, identity: Identity, **changes: object) -> SignedExchange:
    answer = decode_message(exchange.answer)
    statement = dataclasses.replace(SignedStatement.from_meta(answer.meta).statement, **changes)
    meta = sign_statement(identity, statement).to_meta()
    return SignedExchange(exchange.request, encode_message(Message(answer.tensors, meta)))


@SETTINGS
@given(position=st.integers(0, 3), link=hex64)
def test_relinked_transcript_is_rejected(position: int, link: str) -> None:
    """A step signed with any other link than its predecessors give, even by its own
    server, does not open; unsigned relinking fails the signature."""
    exchanges = list(pool()["a"])
    true_link = decode_message(exchanges[position].answer).meta["statement"]
    if link in true_link:
        return
    relinked = list(exchanges)
    relinked[position] = _resigned(exchanges[position], A, chain=link)
    with pytest.raises(EvidenceError, match="not chained"):
        Evidence(tuple(relinked)).open()
    answer = decode_message(exchanges[position].answer)
    forged_meta = {
        **answer.meta,
        "statement": answer.meta["statement"].replace(
            SignedStatement.from_meta(answer.meta).statement.chain, link
        ),
    }
    relinked[position] = SignedExchange(
        exchanges[position].request, encode_message(Message(answer.tensors, forged_meta))
    )
    with pytest.raises(EvidenceError, match="signature"):
        Evidence(tuple(relinked)).open()


def test_output_dtype_must_be_the_signed_dtype() -> None:
    """A bfloat16 answer under a statement saying float32 (the digest covers the
    bfloat16 tensor and is signed): not evidence."""
    exchange = signed_step(A, SessionChain(SID), 7, dtype=torch.bfloat16)
    with pytest.raises(EvidenceError, match="bfloat16; its statement says float32"):
        Evidence((exchange,)).open()
    honest = _resigned(exchange, A, dtype="bfloat16")
    assert Evidence((honest,)).open()[0].output.dtype == torch.bfloat16


@SETTINGS
@given(request=st.binary(max_size=64), answer=st.binary(max_size=64))
def test_undecodable_exchanges_are_evidence_errors(request: bytes, answer: bytes) -> None:
    with pytest.raises(EvidenceError):
        Evidence((SignedExchange(request, answer),)).open()
    with pytest.raises(EvidenceError):
        Evidence((pool()["a"][0], SignedExchange(request, answer))).open()


# -- session ids and links ------------------------------------------------------------------


@SETTINGS
@given(part=st.text(max_size=70))
def test_client_part_rule(part: str) -> None:
    ok = re.fullmatch(r"[A-Za-z0-9_-]{8,64}", part, flags=re.ASCII) is not None
    if ok:
        assert check_client_part(part) == part
    else:
        with pytest.raises(ProtocolError):
            check_client_part(part)


@SETTINGS
@given(nonce=st.text(alphabet="0123456789abcdefABCDEF.x", max_size=40))
def test_server_nonce_rule(nonce: str) -> None:
    if re.fullmatch(r"[0-9a-f]{32}", nonce):
        assert session_id_of("client01", nonce) == "client01." + nonce
    else:
        with pytest.raises(ProtocolError):
            check_server_nonce(nonce)
        with pytest.raises(ProtocolError):
            session_id_of("client01", nonce)


def test_fresh_parts_and_nonces_are_valid_and_distinct() -> None:
    parts = {new_client_part() for _ in range(50)}
    nonces = {new_server_nonce() for _ in range(50)}
    assert len(parts) == len(nonces) == 50
    assert all(
        check_client_part(p) and check_server_nonce(n) for p, n in zip(parts, nonces, strict=True)
    )
    part = next(iter(parts))
    assert len({session_id_of(part, n) for n in nonces}) == 50  # one client part, 50 ids


@SETTINGS
@given(
    session_id=st.text(max_size=100),
    link=hex64,
    request=hex64,
    output=hex64,
    other=hex64,
)
def test_links_depend_on_every_input(
    session_id: str, link: str, request: str, output: str, other: str
) -> None:
    assert first_link(session_id) != first_link(session_id + "x")
    base = next_link(link, request, output)
    assert len(base) == 64 and base == next_link(link, request, output)
    for changed, same in (
        (next_link(other, request, output), other == link),
        (next_link(link, other, output), other == request),
        (next_link(link, request, other), other == output),
        (next_link(link, output, request), output == request),  # order matters
    ):
        assert (changed == base) == same


def test_session_chain_walks_the_links() -> None:
    chain = SessionChain(SID)
    assert (chain.step, chain.link) == (0, first_link(SID))
    statement = _statement(A, chain, b"req", {"hidden_states": torch.zeros(1)})
    chain.advance(statement)
    assert chain.step == 1
    assert chain.link == next_link(first_link(SID), bytes_digest(b"req"), statement.output_digest)
