"""Remote calls to one block server, each answer checked against what we asked."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from trustswarm.protocol.codec import Message
from trustswarm.protocol.digests import bytes_digest, tensors_digest
from trustswarm.protocol.evidence import SignedExchange
from trustswarm.protocol.framing import raise_if_error, receive_message, send_message
from trustswarm.protocol.limits import DEFAULT_LIMITS, Limits
from trustswarm.protocol.statement import Expectation, SignedStatement, check_statement


@dataclass(frozen=True)
class SpanCall:
    """Who computes which blocks, and what digest their weights must have."""

    peer_id: ID
    model_id: str
    start: int
    end: int
    weights_digest: str


async def open_stream(host: IHost, peer_id: ID, protocol: TProtocol, timeout: float) -> INetStream:
    with trio.fail_after(timeout):
        return await host.new_stream(peer_id, [protocol])


async def close_quietly(stream: INetStream | None) -> None:
    if stream is None:
        return
    with trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:  # noqa: S110 - closing a dead stream is fine
            pass


def checked_answer(
    call: SpanCall,
    kind: str,
    raw_request: bytes,
    answer: Message,
    name: str,
    session_id: str = "",
    step: int = 0,
) -> torch.Tensor:
    """Verify the signed statement of an answer field by field; return its tensor."""
    raise_if_error(answer)
    tensor = answer.tensor(name)
    signed = SignedStatement.from_meta(answer.meta)
    check_statement(
        signed,
        Expectation(
            kind=kind,
            server_peer_id=call.peer_id,
            model_id=call.model_id,
            start=call.start,
            end=call.end,
            weights_digest=call.weights_digest,
            request_digest=bytes_digest(raw_request),
            output_digest=tensors_digest({name: tensor}),
            session_id=session_id,
            step=step,
        ),
    )
    return tensor


def request_message(
    call: SpanCall, tensors: dict[str, torch.Tensor | None], **meta: object
) -> Message:
    return Message(
        tensors={k: v for k, v in tensors.items() if v is not None},
        meta={
            "start": str(call.start),
            "end": str(call.end),
            **{k: str(v) for k, v in meta.items()},
        },
    )


async def call_span(
    host: IHost,
    call: SpanCall,
    protocol: TProtocol,
    kind: str,
    tensors: dict[str, torch.Tensor | None],
    answer_name: str,
    timeout: float,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[torch.Tensor, SignedExchange]:
    """One request per stream (forward or backward): the checked output and the
    exchange as sent and received (evidence if the output turns out wrong)."""
    stream = await open_stream(host, call.peer_id, protocol, timeout)
    try:
        with trio.fail_after(timeout):
            raw = await send_message(stream, request_message(call, tensors), limits)
            answer, raw_answer = await receive_message(stream, limits)
    finally:
        await close_quietly(stream)
    output = checked_answer(call, kind, raw, answer, answer_name)
    return output, SignedExchange(raw, raw_answer)
