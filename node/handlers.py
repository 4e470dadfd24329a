"""Stream handlers of a block server: info, forward, backward, inference.

Every handler answers a bad request with an error frame and returns; nothing a
peer sends can take the server down or disturb another peer's streams.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import trio
from libp2p.abc import INetStream

from trustswarm.models.compute import run_limited
from trustswarm.models.runner import BlockRunner, InferenceCache, RunnerError
from trustswarm.protocol.chained import is_chain_frame
from trustswarm.protocol.codec import Message, decode_message, dtype_name
from trustswarm.protocol.digests import bytes_digest, tensors_digest
from trustswarm.protocol.errors import (
    BAD_REQUEST,
    BUSY,
    INTERNAL,
    TOO_LARGE,
    LimitExceededError,
    ProtocolError,
)
from trustswarm.protocol.framing import (
    StreamClosed,
    error_message,
    read_exact,
    read_frame,
    receive_message,
    send_message,
)
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.sessions import (
    SessionChain,
    check_client_part,
    new_server_nonce,
    session_id_of,
)
from trustswarm.protocol.statement import SignedStatement, Statement, sign_statement

from .admission import SessionAdmission, kv_bytes_per_token
from .config import ServerConfig
from .requests import attention_mask_of, hidden_states_of, positions_of, validate_span
from .step_batcher import StepBatcher, StepRequest

if TYPE_CHECKING:
    from .forwarding import ChainedSteps

log = logging.getLogger("trustswarm.node")


@dataclass
class ServingContext:
    identity: Identity
    runner: BlockRunner
    model_id: str
    span_digest: Callable[[int, int], str]
    config: ServerConfig
    info: Callable[[], dict]
    compute: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    admission: SessionAdmission | None = None  # from config unless given (shared by copies)
    served_requests: int = 0
    # Batches concurrent sessions' steps (node/step_batcher.py); from config unless given.
    batcher: StepBatcher | None = None
    # Chained inference steps (node/forwarding.py); None: this server takes none.
    chained: ChainedSteps | None = None

    def __post_init__(self) -> None:
        if self.admission is None:
            config = self.config
            self.admission = SessionAdmission(
                config.max_sessions, config.max_sessions_per_peer, config.kv_cache_bytes
            )
        if self.batcher is None and self.config.batch_steps:
            self.batcher = StepBatcher(self.runner, self.compute)

    @property
    def active_sessions(self) -> int:
        return self.admission.active if self.admission is not None else 0

    async def run(self, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        return await run_limited(self.compute, fn, *args)

    async def run_step(
        self,
        cache: InferenceCache,
        hidden: torch.Tensor,
        positions: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """runner.step, batched with other sessions' concurrent steps when this server
        batches. A context whose run() is not the plain one (a test adversary, a
        profiler) sees every step through run(), alone."""
        if self.batcher is None or type(self).run is not _PLAIN_RUN:
            return await self.run(self.runner.step, cache, hidden, positions, mask)
        return await self.batcher.step(StepRequest(cache, hidden, positions, mask))

    def session_nonce(self) -> str:
        """The server's half of a new session's id: fresh randomness every time."""
        return new_server_nonce()

    def signed_answer(
        self,
        kind: str,
        start: int,
        end: int,
        raw_request: bytes,
        output: torch.Tensor,
        name: str,
        peer: str,
        session_id: str = "",
        step: int = 0,
        chain: str = "",
    ) -> Message:
        """Sign `output` as the answer to `raw_request` from `peer`, in its own dtype
        (an honest server's compute dtype, the one it announced)."""
        tensors = {name: output.contiguous()}
        statement = Statement(
            kind=kind,
            server_peer_id=str(self.identity.peer_id),
            model_id=self.model_id,
            start=start,
            end=end,
            weights_digest=self.span_digest(start, end),
            request_digest=bytes_digest(raw_request),
            output_digest=tensors_digest(tensors),
            session_id=session_id,
            step=step,
            chain=chain,
            dtype=dtype_name(output.dtype),
            timestamp=time.time(),
        )
        self.served_requests += 1
        return Message(tensors=tensors, meta=sign_statement(self.identity, statement).to_meta())


_PLAIN_RUN = ServingContext.run


def _error_code(exc: Exception) -> str:
    if isinstance(exc, LimitExceededError):
        return TOO_LARGE
    if isinstance(exc, ProtocolError | RunnerError):
        return BAD_REQUEST
    if isinstance(exc, trio.TooSlowError):  # a peer too slow to send or read: its doing
        return BAD_REQUEST
    return INTERNAL


Handler = Callable[[ServingContext, INetStream], Awaitable[None]]


def guarded(
    ctx: ServingContext, name: str, body: Handler
) -> Callable[[INetStream], Awaitable[None]]:
    """Wrap a handler: any failure becomes an error frame, the stream is closed."""

    async def handler(stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            await body(ctx, stream)
        except StreamClosed:
            pass
        except Exception as exc:
            code = _error_code(exc)
            if code == INTERNAL:
                log.exception("%s from %s failed", name, peer)
                text = f"internal error ({type(exc).__name__})"
            else:
                log.info("%s from %s refused: %s", name, peer, exc)
                text = str(exc)
            with trio.move_on_after(2):
                try:
                    await send_message(stream, error_message(code, text), ctx.config.limits)
                except Exception:  # noqa: S110 - the peer may already be gone
                    pass
        finally:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:  # noqa: S110
                    pass

    return handler


def _peer(stream: INetStream) -> str:
    return str(stream.muxed_conn.peer_id)


async def _receive(
    ctx: ServingContext, stream: INetStream, timeout: float
) -> tuple[Message, bytes]:
    with trio.fail_after(timeout):
        return await receive_message(stream, ctx.config.limits)


async def send_answer(ctx: ServingContext, stream: INetStream, message: Message) -> None:
    """Write one answer within `write_timeout`: a peer that reads slowly (grants a few
    bytes of window at a time) cannot hold a handler longer than that."""
    with trio.fail_after(ctx.config.write_timeout):
        await send_message(stream, message, ctx.config.limits)


async def handle_info(ctx: ServingContext, stream: INetStream) -> None:
    await _receive(ctx, stream, ctx.config.request_timeout)
    info = ctx.info()
    await send_answer(ctx, stream, Message(meta={"info": json.dumps(info)}))


async def _serve_requests(
    ctx: ServingContext,
    stream: INetStream,
    answer: Callable[[ServingContext, INetStream, Message, bytes], Awaitable[None]],
) -> None:
    """Answer requests on one stream, one after another, until the peer closes it or
    leaves it idle. Reusing a stream saves its set-up (several round trips in
    py-libp2p: yamux open and multistream-select), which dominates on a slow link."""
    request, raw = await _receive(ctx, stream, ctx.config.request_timeout)
    while True:
        await answer(ctx, stream, request, raw)
        first = b""
        with trio.move_on_after(ctx.config.stream_idle_timeout):
            try:
                first = await read_exact(stream, 1)
            except StreamClosed:
                return
        if not first:
            return  # idle: close it; the client opens a new one when it needs one
        request, raw = await _receive_rest(ctx, stream, first)


async def _receive_rest(
    ctx: ServingContext, stream: INetStream, first: bytes
) -> tuple[Message, bytes]:
    with trio.fail_after(ctx.config.request_timeout):
        return await receive_message(_Prefixed(first, stream), ctx.config.limits)


class _Prefixed:
    """A stream whose first bytes were already read (to wait for a request while idle)."""

    def __init__(self, head: bytes, stream: INetStream) -> None:
        self.head, self.stream = head, stream

    async def read(self, n: int | None = None) -> bytes:
        if self.head:
            head, self.head = self.head, b""
            return head
        return await self.stream.read(n)

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)


async def handle_forward(ctx: ServingContext, stream: INetStream) -> None:
    await _serve_requests(ctx, stream, _forward_one)


async def _forward_one(
    ctx: ServingContext, stream: INetStream, request: Message, raw: bytes
) -> None:
    start, end = validate_span(request, ctx.runner.start, ctx.runner.end)
    hidden = hidden_states_of(request, ctx.runner.hidden_size, ctx.config)
    batch, tokens = hidden.shape[:2]
    positions = positions_of(request, batch, tokens)
    mask = attention_mask_of(request, batch, tokens)
    output = await ctx.run(ctx.runner.forward, hidden, positions, mask, start, end)
    answer = ctx.signed_answer("forward", start, end, raw, output, "hidden_states", _peer(stream))
    await send_answer(ctx, stream, answer)


async def handle_backward(ctx: ServingContext, stream: INetStream) -> None:
    await _serve_requests(ctx, stream, _backward_one)


async def _backward_one(
    ctx: ServingContext, stream: INetStream, request: Message, raw: bytes
) -> None:
    start, end = validate_span(request, ctx.runner.start, ctx.runner.end)
    hidden = hidden_states_of(request, ctx.runner.hidden_size, ctx.config)
    batch, tokens = hidden.shape[:2]
    grad = request.tensor("grad_outputs")
    if grad.shape != hidden.shape or not grad.is_floating_point():
        raise ProtocolError(f"grad_outputs must match hidden_states {list(hidden.shape)}")
    positions = positions_of(request, batch, tokens)
    mask = attention_mask_of(request, batch, tokens)
    output = await ctx.run(ctx.runner.backward, hidden, grad, positions, mask, start, end)
    answer = ctx.signed_answer("backward", start, end, raw, output, "grad_inputs", _peer(stream))
    await send_answer(ctx, stream, answer)


@dataclass
class _OpenSession:
    """One inference session on one stream: its span, limits, KV cache and chain."""

    start: int
    end: int
    batch: int
    max_length: int
    nonce: str  # the server's half of the session id
    chain: SessionChain
    cache: InferenceCache | None = None


def _session_request(ctx: ServingContext, opening: Message) -> _OpenSession:
    """Validate an open frame; the session it asks for (no cache yet)."""
    config = ctx.config
    start, end = validate_span(opening, ctx.runner.start, ctx.runner.end)
    client_part = check_client_part(opening.field("session_id"))
    max_length = opening.int_field("max_length", low=1)
    batch = opening.int_field("batch_size", low=1)
    if max_length > config.max_session_tokens:
        raise LimitExceededError(f"max_length {max_length} exceeds {config.max_session_tokens}")
    if batch > config.max_batch:
        raise LimitExceededError(f"batch {batch} exceeds this server's max {config.max_batch}")
    # The server draws half of the id: no client can open two sessions with one id.
    nonce = ctx.session_nonce()
    chain = SessionChain(session_id_of(client_part, nonce))
    return _OpenSession(start, end, batch, max_length, nonce, chain)


async def handle_inference(ctx: ServingContext, stream: INetStream) -> None:
    """A long-lived session: one open frame, then one step frame per decoding step.

    The open answer carries the session id (`<client part>.<server nonce>`) that every
    step request and signed statement names; statement n carries the chain link of
    steps 0..n-1 (protocol/sessions.py)."""
    config = ctx.config
    opening, _ = await _receive(ctx, stream, config.request_timeout)
    session = _session_request(ctx, opening)
    peer, admission = _peer(stream), ctx.admission
    runner = ctx.runner
    per_token = kv_bytes_per_token(runner.config, session.end - session.start, runner.dtype)
    kv_bytes = session.batch * session.max_length * per_token
    refusal = admission.refusal(peer, kv_bytes)
    if refusal is not None:
        log.info("inference session from %s refused: %s", peer, refusal)
        await send_answer(ctx, stream, error_message(BUSY, refusal))
        return
    admission.admit(peer, kv_bytes)
    try:
        session.cache = runner.new_cache(
            session.batch, session.max_length, session.start, session.end
        )
        opened = {"opened": session.chain.session_id, "nonce": session.nonce}
        if ctx.chained is not None:
            ctx.chained.opened(ctx, session)
        await send_answer(ctx, stream, Message(meta=opened))
        while True:
            try:
                with trio.fail_after(config.session_idle_timeout):
                    raw = await read_frame(stream, config.limits)
            except StreamClosed:
                return
            if ctx.chained is not None and is_chain_frame(raw):
                await ctx.chained.step(ctx, stream, session, raw)
                continue
            await _session_step(ctx, stream, session, decode_message(raw, config.limits), raw)
    finally:
        if ctx.chained is not None:
            ctx.chained.closed(session.chain.session_id)
        admission.release(peer, kv_bytes)


async def _session_step(
    ctx: ServingContext, stream: INetStream, session: _OpenSession, request: Message, raw: bytes
) -> Message:
    chain, batch, cache = session.chain, session.batch, session.cache
    if (
        request.meta.get("session_id") != chain.session_id
        or request.int_field("step") != chain.step
    ):
        raise ProtocolError(f"expected step {chain.step} of session {chain.session_id}")
    hidden = hidden_states_of(request, ctx.runner.hidden_size, ctx.config)
    if hidden.shape[0] != batch:
        raise ProtocolError(f"session batch is {batch}, got {hidden.shape[0]}")
    tokens = hidden.shape[1]
    if cache.length + tokens > session.max_length:
        raise LimitExceededError(f"session would exceed its max_length {session.max_length}")
    positions = positions_of(request, batch, tokens)
    mask = attention_mask_of(request, batch, cache.length + tokens)
    output = await ctx.run_step(cache, hidden, positions, mask)
    answer = ctx.signed_answer(
        "inference",
        session.start,
        session.end,
        raw,
        output,
        "hidden_states",
        _peer(stream),
        chain.session_id,
        chain.step,
        chain.link,
    )
    await send_answer(ctx, stream, answer)
    # The next link follows what was signed (a subclass may sign something else).
    chain.advance(SignedStatement.from_meta(answer.meta).statement)
    return answer  # chained steps forward it (node/forwarding.py)
