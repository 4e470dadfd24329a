"""The server side of chained inference steps (protocol/chained.py).

A chain frame arrives on a client's session stream and runs inside that session's own
loop (`ChainedSteps.step`): the hop waits for its input from the upstream the client
named, runs the step exactly as a client-driven one (`_session_step`: same checks,
signing and answer to the client on its stream) and forwards its signed answer to the
next hop. Forwarded inputs arrive on `/trustswarm/chain/1` (`ChainedSteps.accept`), are
acknowledged at once (a link never waits on one session) and handed to the waiting
session through its inbox; one that comes before its chain frame is kept (one per
sender, MAX_EARLY_SECONDS) and checked when the frame comes.

Limits, because a client names the next hop: a hop forwards only to another peer whose
signed announcement (asked of the peer itself) serves this model's next blocks with the
manifest's weights, at most one output per executed step (never more bytes than the
step's own output: no amplification), over at most MAX_LINKS kept streams, within
MAX_FORWARD_SECONDS. A check that failed is not retried for FAILED_PEER_SECONDS (for that
peer, block and addresses only: a client cannot get a good peer refused to others), and
a client that named it may name only already-checked peers for as long: one client
session cannot make a server dial a list of addresses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from trustswarm.protocol import protocols
from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.chained import (
    INPUT_MISSING,
    MAX_CHAIN_TOKENS,
    MAX_FORWARD_SECONDS,
    TO_SESSION,
    ChainFrame,
    Downstream,
    Expected,
    check_forwarded,
    forwarded_input,
    parse_chain_frame,
    splice_hidden,
)
from trustswarm.protocol.codec import Message, decode_message
from trustswarm.protocol.errors import BUSY, LimitExceededError, ProtocolError, SignatureError
from trustswarm.protocol.framing import (
    close_quietly,
    error_message,
    raise_if_error,
    receive_message,
    send_message,
)
from trustswarm.protocol.info import call_info
from trustswarm.protocol.transport import parse_multiaddr

from .handlers import (
    ServingContext,
    _OpenSession,
    _peer,
    _serve_requests,
    _session_step,
    send_answer,
)

log = logging.getLogger("trustswarm.node")

MAX_LINKS = 32  # streams to next hops, open at once
LINK_IDLE = 20.0  # seconds an idle link is reused (receivers close theirs after 30)
MAX_IDLE_PER_PEER = 4
MAX_EARLY_SECONDS = 5.0  # an input that came before its chain frame is kept this long
MAX_EARLY_SENDERS = 4  # peers whose early inputs are kept for one session at once
EARLY_OVERHEAD = 4096  # bytes of an early input beyond its tensor (header, statement)
FAILED_PEER_SECONDS = 30.0
MAX_KNOWN_PEERS = 256


@dataclass
class _Input:
    expected: Expected
    hidden: torch.Tensor


@dataclass
class _Inbox:
    """Where one session's forwarded input lands. `expected` is set only while a chain
    frame waits for its input; nothing else goes in the channel."""

    start: int  # the session's first block: a forwarded output must end there
    max_early_bytes: int  # the largest input kept before its chain frame
    expected: Expected | None = None
    # Inputs that came before their chain frame, by sender (a stranger who knows the
    # session id cannot crowd out the upstream's input): (message, arrival time).
    early: dict[str, tuple[Message, float]] = field(default_factory=dict)
    send: trio.MemorySendChannel = None  # type: ignore[assignment]
    receive: trio.MemoryReceiveChannel = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel(1)

    def drain(self) -> None:
        while True:
            try:
                self.receive.receive_nowait()
            except trio.WouldBlock:
                return


@dataclass
class _Links:
    """Streams to next hops: an idle one is reused, at most MAX_LINKS open at once
    (concurrent sessions forwarding to one peer each use their own)."""

    host: IHost
    idle: dict[str, list[tuple[INetStream, float]]] = field(default_factory=dict)
    open: int = 0

    async def take(self, peer: str) -> tuple[INetStream, bool]:
        """A stream to `peer` and whether it is a fresh one."""
        streams = self.idle.get(peer, [])
        now = time.monotonic()
        while streams:
            stream, since = streams.pop()
            if now - since < LINK_IDLE:
                return stream, False
            await self.drop(stream)
        if self.open >= MAX_LINKS:
            raise ProtocolError(f"this server keeps at most {MAX_LINKS} forwarding streams")
        self.open += 1
        try:
            return await self.host.new_stream(ID.from_base58(peer), [protocols.CHAIN]), True
        except BaseException:
            self.open -= 1
            raise

    async def give(self, peer: str, stream: INetStream) -> None:
        streams = self.idle.setdefault(peer, [])
        if len(streams) >= MAX_IDLE_PER_PEER:
            await self.drop(stream)
        else:
            streams.append((stream, time.monotonic()))

    async def drop(self, stream: INetStream) -> None:
        self.open -= 1
        await close_quietly(stream)


@dataclass
class ChainedSteps:
    host: IHost
    inboxes: dict[str, _Inbox] = field(default_factory=dict)
    links: _Links = None  # type: ignore[assignment]
    # peer -> (start, end, expiry) of the announcement it passed the checks with
    next_ok: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    # (peer, block, addresses) that failed the checks -> until when it is not retried
    # (only that request: a client cannot get a good peer refused to other clients by
    # naming it for other blocks or at addresses where it is not)
    failed_until: dict[tuple[str, int, tuple[str, ...]], float] = field(default_factory=dict)
    # client -> until when it may name only peers that already passed the checks
    clients_failed_until: dict[str, float] = field(default_factory=dict)
    forwarded: int = 0  # outputs passed on (for tests and the bench)
    checks: int = 0  # next hops dialled and checked (for tests)

    def __post_init__(self) -> None:
        if self.links is None:
            self.links = _Links(self.host)

    # -- session lifetime (called by handle_inference) ------------------------------

    def opened(self, ctx: ServingContext, session: _OpenSession) -> None:
        tensor = session.batch * MAX_CHAIN_TOKENS * ctx.runner.hidden_size * 4
        self.inboxes[session.chain.session_id] = _Inbox(session.start, tensor + EARLY_OVERHEAD)

    def closed(self, session_id: str) -> None:
        self.inboxes.pop(session_id, None)

    # -- a chain frame on a session stream -----------------------------------------

    async def step(
        self, ctx: ServingContext, stream: INetStream, session: _OpenSession, payload: bytes
    ) -> None:
        frame = parse_chain_frame(payload, ctx.config.limits)
        raw = frame.request
        if frame.upstream is not None:
            hidden = await self._input(ctx, session, frame)
            if hidden is None:
                text = f"{INPUT_MISSING} from {frame.upstream.peer} within {frame.wait:g} s"
                await send_answer(ctx, stream, error_message(BUSY, text))
                return  # the session is untouched: the client sends the step itself
            raw = splice_hidden(raw, hidden, ctx.config.limits)
        request = decode_message(raw, ctx.config.limits)
        answer = await _session_step(ctx, stream, session, request, raw)
        if frame.next is not None:
            try:
                await self._forward(ctx, session, frame.next, answer, _peer(stream))
            except Exception as exc:  # the client has our answer; the next hop times out
                log.info("forwarding to %s failed: %s", frame.next.peer, exc)

    async def _input(
        self, ctx: ServingContext, session: _OpenSession, frame: ChainFrame
    ) -> torch.Tensor | None:
        """The input the frame's upstream forwards within the frame's wait, or None."""
        inbox = self.inboxes[session.chain.session_id]
        inbox.drain()  # a late input of an earlier step
        expected = Expected(frame.upstream, session.start, frame.shape)
        early, inbox.early = inbox.early.get(expected.upstream.peer), {}
        if early is not None and time.monotonic() - early[1] < MAX_EARLY_SECONDS:
            try:
                return check_forwarded(early[0], expected, expected.upstream.peer, ctx.model_id)
            except (ProtocolError, SignatureError) as exc:
                log.info("early forwarded input refused: %s", exc)
        inbox.expected = expected
        try:
            with trio.move_on_after(frame.wait):
                while True:
                    item = await inbox.receive.receive()
                    if item.expected == expected:
                        return item.hidden
        finally:
            inbox.expected = None
        return None

    # -- forwarding to the next hop ------------------------------------------------

    async def _forward(
        self,
        ctx: ServingContext,
        session: _OpenSession,
        nxt: Downstream,
        answer: Message,
        client: str,
    ) -> None:
        message = forwarded_input(answer, nxt.session_id)
        with trio.fail_after(MAX_FORWARD_SECONDS):
            await self._check_next(ctx, session, nxt, client)
            while True:
                stream, fresh = await self.links.take(nxt.peer)
                try:
                    await send_message(stream, message, ctx.config.limits)
                    ack, _ = await receive_message(stream, ctx.config.limits)
                except BaseException:
                    await self.links.drop(stream)
                    if fresh:
                        raise
                    continue  # closed by the next hop while idle: use a fresh stream
                try:
                    raise_if_error(ack)
                except BaseException:
                    await self.links.drop(stream)
                    raise
                await self.links.give(nxt.peer, stream)
                break
        self.forwarded += 1

    async def _check_next(
        self, ctx: ServingContext, session: _OpenSession, nxt: Downstream, client: str
    ) -> None:
        """The next hop must be another peer that announces (signed, asked of itself)
        this model's blocks from where this session ends, with the manifest's weights."""
        now = time.time()
        start, end, until = self.next_ok.get(nxt.peer, (0, 0, 0.0))
        if until > now and start <= session.end < end:
            return
        if nxt.peer == str(ctx.identity.peer_id):
            raise ProtocolError("the next hop is this server")
        failed = (nxt.peer, session.end, nxt.addrs)
        if self.failed_until.get(failed, 0.0) > now:
            raise ProtocolError(f"next hop {nxt.peer} failed its checks recently")
        if self.clients_failed_until.get(client, 0.0) > now:
            raise ProtocolError("this client named a next hop that failed its checks recently")
        self._prune(now)
        self.checks += 1
        try:
            ann = await self._announcement(ctx, nxt)
            if not ann.start <= session.end < ann.end:
                raise ProtocolError(f"it announces blocks {ann.start}:{ann.end}")
        except Exception as exc:
            self.failed_until[failed] = now + FAILED_PEER_SECONDS
            self.clients_failed_until[client] = now + FAILED_PEER_SECONDS
            raise ProtocolError(f"next hop {nxt.peer} refused: {exc}") from None
        self.next_ok[nxt.peer] = (ann.start, ann.end, ann.expires_at)

    async def _announcement(self, ctx: ServingContext, nxt: Downstream) -> Announcement:
        """The next hop's own signed announcement of this model with the manifest's
        weights (dialled at the addresses the client gave)."""
        peer_id = ID.from_base58(nxt.peer)
        addrs = [parse_multiaddr(a.split("/p2p/")[0]) for a in nxt.addrs]
        await self.host.connect(PeerInfo(peer_id, addrs))
        info = await call_info(self.host, peer_id, MAX_FORWARD_SECONDS, ctx.config.limits)
        signed = info.announcement
        signed.verify()
        ann = signed.announcement
        if ann.peer_id != nxt.peer or ann.model_id != ctx.model_id:
            raise ProtocolError("its announcement is another peer's or another model's")
        if ann.weights_digest != ctx.span_digest(ann.start, ann.end):
            raise ProtocolError("its announcement names other weights")
        return ann

    def _prune(self, now: float) -> None:
        """Keep each table below MAX_KNOWN_PEERS entries: expired ones go first."""
        _prune(self.next_ok, lambda value: value[2], now)
        _prune(self.failed_until, float, now)
        _prune(self.clients_failed_until, float, now)

    # -- forwarded inputs from an upstream hop ---------------------------------------

    async def accept(self, ctx: ServingContext, stream: INetStream) -> None:
        await _serve_requests(ctx, stream, self._accept_one)

    async def _accept_one(
        self, ctx: ServingContext, stream: INetStream, request: Message, raw: bytes
    ) -> None:
        inbox = self.inboxes.get(request.field(TO_SESSION))
        if inbox is None:
            raise ProtocolError("no such session on this server")
        sender = _peer(stream)
        expected = inbox.expected
        if expected is None:  # before its chain frame: kept for it, checked then
            if sender not in inbox.early and len(inbox.early) >= MAX_EARLY_SENDERS:
                raise ProtocolError("too many early inputs wait for this session")
            if len(raw) > inbox.max_early_bytes:
                raise LimitExceededError("an early input larger than any chained step's")
            inbox.early[sender] = (request, time.monotonic())
            await send_answer(ctx, stream, Message(meta={"accepted": "early"}))
            return
        try:
            hidden = check_forwarded(request, expected, sender, ctx.model_id)
        except SignatureError as exc:
            raise ProtocolError(f"forwarded input refused: {exc}") from None
        try:
            inbox.send.send_nowait(_Input(expected, hidden))
        except trio.WouldBlock:
            raise ProtocolError("an input for this step was already accepted") from None
        await send_answer(ctx, stream, Message(meta={"accepted": "1"}))


def _prune(table: dict, expiry: Callable[[Any], float], now: float) -> None:
    if len(table) >= MAX_KNOWN_PEERS:
        for key in [k for k, v in table.items() if expiry(v) <= now]:
            del table[key]
    while len(table) >= MAX_KNOWN_PEERS:  # all live: forget the oldest entries
        del table[next(iter(table))]


async def handle_chain(ctx: ServingContext, stream: INetStream) -> None:
    """`/trustswarm/chain/1`: forwarded inputs from upstream hops."""
    if ctx.chained is None:
        raise ProtocolError("this server does not take chained steps")
    await ctx.chained.accept(ctx, stream)
