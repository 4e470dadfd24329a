"""Sending a challenge to one server, exactly as a client would, and keeping the evidence.

Each probe runs on its own libp2p host with a fresh identity (never the verifier's
published one), dials the server, asks for its info as a client's discovery does, then
sends a forward request or opens an inference session (prefill, then 1-token steps)
with the client library's own message layout and checks every signed answer as a
client does. What comes back is the evidence: each request and answer byte for byte.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import multiaddr
import torch
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo

from trustswarm.client.rpc import SpanCall, checked_statement, close_quietly, open_stream
from trustswarm.client.rpc import request_message as span_request
from trustswarm.client.session import open_session
from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message
from trustswarm.protocol.errors import ProtocolError, SignatureError, TrustswarmError
from trustswarm.protocol.evidence import Evidence, SignedExchange
from trustswarm.protocol.framing import raise_if_error, receive_message, send_message
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.info import call_info
from trustswarm.protocol.sessions import SessionChain, SessionError
from trustswarm.protocol.transport import make_host

from .challenges import Challenge


class InvalidAnswer(TrustswarmError):
    """A server answered, but not with a valid signed answer to our request."""


def fresh_host(swarm_key: str | None = None) -> IHost:
    """A host under a new, never reused identity: a check looks like a new client."""
    return make_host(Identity.generate(), swarm_key)


async def probe(
    host: IHost,
    call: SpanCall,
    addrs: Sequence[str],
    challenge: Challenge,
    inference: bool,
    timeout: float,
    rng: random.Random | None = None,
) -> Evidence:
    """Send `challenge` to the server named by `call`; return the signed exchanges.

    Raises InvalidAnswer for an answer that fails the client's checks (bad signature,
    wrong digests, wrong shape), RemoteError for an error frame, and trio.TooSlowError
    or other TrustswarmErrors when the server cannot be reached.
    """
    rng = rng or random.Random()
    with trio.fail_after(timeout):
        await host.connect(PeerInfo(call.peer_id, [_strip_p2p(a) for a in addrs]))
    await call_info(host, call.peer_id, timeout)
    if inference:
        exchanges = await _session(host, call, challenge, timeout, rng)
    elif challenge.grad_outputs is not None:
        exchanges = [await _backward(host, call, challenge, timeout)]
    else:
        exchanges = [await _forward(host, call, challenge, timeout)]
    return Evidence(tuple(exchanges))


def _checked(
    call: SpanCall,
    kind: str,
    raw: bytes,
    answer: Message,
    session: SessionChain | None = None,
    name: str = "hidden_states",
) -> None:
    """The client's checks (signature, every field, the announced dtype); a session
    advances past the step. A signed answer of the wrong shape passes here: it is still
    a signed statement, and the judge's comparison turns it into proof."""
    raise_if_error(answer)  # RemoteError: the server declined; not evidence of anything
    try:
        _, statement = checked_statement(call, kind, raw, answer, name, session)
    except (SignatureError, ProtocolError) as exc:
        raise InvalidAnswer(f"{kind} answer fails the client's checks: {exc}") from None
    if session is not None:
        session.advance(statement)


async def _forward(host: IHost, call: SpanCall, challenge: Challenge, timeout: float):
    step = challenge.steps[0]
    tensors = {
        "hidden_states": step.hidden,
        "position_ids": step.positions,
        "attention_mask": step.mask,
    }
    return await _one_shot(host, call, protocols.FORWARD, "forward", tensors, timeout)


async def _backward(host: IHost, call: SpanCall, challenge: Challenge, timeout: float):
    step = challenge.steps[0]
    tensors = {
        "hidden_states": step.hidden,
        "grad_outputs": challenge.grad_outputs,
        "position_ids": step.positions,
        "attention_mask": step.mask,
    }
    return await _one_shot(host, call, protocols.BACKWARD, "backward", tensors, timeout)


async def _one_shot(
    host: IHost,
    call: SpanCall,
    protocol: TProtocol,
    kind: str,
    tensors: dict[str, torch.Tensor],
    timeout: float,
) -> SignedExchange:
    request = span_request(call, tensors)
    stream = await open_stream(host, call.peer_id, protocol, timeout)
    try:
        with trio.fail_after(timeout):
            raw = await send_message(stream, request)
            answer, raw_answer = await receive_message(stream)
    finally:
        await close_quietly(stream)
    name = "grad_inputs" if kind == "backward" else "hidden_states"
    _checked(call, kind, raw, answer, name=name)
    return SignedExchange(raw, raw_answer)


async def _session(
    host: IHost, call: SpanCall, challenge: Challenge, timeout: float, rng: random.Random
) -> list[SignedExchange]:
    # A client asks for prompt + max_new_tokens and may stop early (end of sequence).
    max_length = challenge.total_tokens + rng.choice((0, 0, 4, 16, 32))
    stream = await open_stream(host, call.peer_id, protocols.INFERENCE, timeout)
    exchanges: list[SignedExchange] = []
    try:
        try:
            session = await open_session(stream, call, max_length, 1, timeout)
        except SessionError as exc:  # not a lost stream or a declined session: a bad answer
            raise InvalidAnswer(f"inference open answer fails the client's checks: {exc}") from None
        for step in challenge.steps:
            request = Message(
                tensors={
                    "hidden_states": step.hidden,
                    "position_ids": step.positions,
                    "attention_mask": step.mask,
                },
                meta={"session_id": session.session_id, "step": str(session.step)},
            )
            with trio.fail_after(timeout):
                raw = await send_message(stream, request)
                answer, raw_answer = await receive_message(stream)
            _checked(call, "inference", raw, answer, session)
            exchanges.append(SignedExchange(raw, raw_answer))
    finally:
        await close_quietly(stream)
    return exchanges


def _strip_p2p(addr: str) -> multiaddr.Multiaddr:
    return multiaddr.Multiaddr(addr.split("/p2p/")[0])
