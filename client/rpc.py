"""Remote calls to one block server, each answer checked against what we asked."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from trustswarm.protocol.codec import Message, dtype_name
from trustswarm.protocol.digests import bytes_digest, tensors_digest
from trustswarm.protocol.errors import ProtocolError, SignatureError
from trustswarm.protocol.evidence import SignedExchange
from trustswarm.protocol.framing import (
    close_quietly,
    raise_if_error,
    receive_message,
    send_message,
)
from trustswarm.protocol.limits import DEFAULT_LIMITS, Limits
from trustswarm.protocol.sessions import SessionChain
from trustswarm.protocol.statement import (
    Expectation,
    SignedStatement,
    Statement,
    check_statement,
)


class InvalidAnswer(SignatureError, ProtocolError):
    """A server answered, but not with a valid signed answer to our request (bad
    signature, a field that does not match, the wrong dtype, no output tensor): the
    answer fails the client's checks. Not raised for error frames (RemoteError) or for
    streams that break (the server did not answer at all)."""


@dataclass(frozen=True)
class SpanCall:
    """Who computes which blocks, what digest their weights must have, and the dtype
    the server announced (signed): its answers must be in it."""

    peer_id: ID
    model_id: str
    start: int
    end: int
    weights_digest: str
    dtype: str


async def open_stream(host: IHost, peer_id: ID, protocol: TProtocol, timeout: float) -> INetStream:
    with trio.fail_after(timeout):
        return await host.new_stream(peer_id, [protocol])


def checked_answer(
    call: SpanCall,
    kind: str,
    raw_request: bytes,
    answer: Message,
    name: str,
    session: SessionChain | None = None,
) -> torch.Tensor:
    """Verify the signed statement of an answer field by field; return its tensor."""
    return checked_statement(call, kind, raw_request, answer, name, session)[0]


def checked_statement(
    call: SpanCall,
    kind: str,
    raw_request: bytes,
    answer: Message,
    name: str,
    session: SessionChain | None = None,
) -> tuple[torch.Tensor, Statement]:
    """Verify an answer: its wire dtype is the announced one, and its signed statement
    matches the request field by field (for an inference step: `session`'s id, step and
    chain link). Returns the tensor and the statement (to advance `session` with).
    Raises RemoteError for an error frame, InvalidAnswer for an answer that fails."""
    raise_if_error(answer)
    try:
        return _checked(call, kind, raw_request, answer, name, session)
    except (SignatureError, ProtocolError) as exc:
        raise InvalidAnswer(f"{kind} answer fails the client's checks: {exc}") from exc


def _checked(
    call: SpanCall,
    kind: str,
    raw_request: bytes,
    answer: Message,
    name: str,
    session: SessionChain | None,
) -> tuple[torch.Tensor, Statement]:
    tensor = answer.tensor(name)
    if dtype_name(tensor.dtype) != call.dtype:
        raise ProtocolError(
            f"server announced {call.dtype} but answered in {dtype_name(tensor.dtype)}"
        )
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
            dtype=call.dtype,
            session_id=session.session_id if session else "",
            step=session.step if session else 0,
            chain=session.link if session else "",
        ),
    )
    return tensor, signed.statement


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


@dataclass
class StreamPool:
    """Idle forward/backward streams per (peer, protocol), reused by the next request.

    Opening a stream costs several round trips in py-libp2p (yamux open, then
    multistream-select), more than the request itself on a slow link. Servers keep a
    stream open for more requests for `stream_idle_timeout` (30 s by default); the
    pool drops streams idle for longer than `max_idle` (below that)."""

    max_idle: float = 20.0
    max_per_key: int = 4
    idle: dict[tuple[str, str], list[tuple[INetStream, float]]] = field(default_factory=dict)

    async def take(self, peer_id: ID, protocol: TProtocol) -> INetStream | None:
        streams = self.idle.get((str(peer_id), protocol), [])
        now = time.monotonic()
        while streams:
            stream, since = streams.pop()
            if now - since < self.max_idle:
                return stream
            await close_quietly(stream)
        return None

    async def give(self, peer_id: ID, protocol: TProtocol, stream: INetStream) -> None:
        streams = self.idle.setdefault((str(peer_id), protocol), [])
        if len(streams) >= self.max_per_key:
            await close_quietly(stream)
        else:
            streams.append((stream, time.monotonic()))


async def call_span(
    host: IHost,
    call: SpanCall,
    protocol: TProtocol,
    kind: str,
    tensors: dict[str, torch.Tensor | None],
    answer_name: str,
    timeout: float,
    limits: Limits = DEFAULT_LIMITS,
    pool: StreamPool | None = None,
) -> tuple[torch.Tensor, SignedExchange]:
    """One request (forward or backward): the checked output and the exchange as sent
    and received (evidence if the output turns out wrong). With a pool, an idle stream
    to the same server is reused; if the server closed it meanwhile, a new one is
    opened (that is not the server's fault)."""
    request = request_message(call, tensors)
    stream = await pool.take(call.peer_id, protocol) if pool is not None else None
    if stream is not None:
        try:
            with trio.fail_after(timeout):
                raw = await send_message(stream, request, limits)
                answer, raw_answer = await receive_message(stream, limits)
        except trio.TooSlowError:
            await close_quietly(stream)
            raise
        except Exception:
            await close_quietly(stream)
            stream = None  # closed by the server while idle: use a fresh stream
    if stream is None:
        stream = await open_stream(host, call.peer_id, protocol, timeout)
        try:
            with trio.fail_after(timeout):
                raw = await send_message(stream, request, limits)
                answer, raw_answer = await receive_message(stream, limits)
        except BaseException:
            await close_quietly(stream)
            raise
    try:
        output = checked_answer(call, kind, raw, answer, answer_name)
    except BaseException:
        await close_quietly(stream)
        raise
    if pool is not None:
        await pool.give(call.peer_id, protocol, stream)
    else:
        await close_quietly(stream)
    return output, SignedExchange(raw, raw_answer)
