"""Inference sessions across a chain of servers, with failover by history replay.

Each hop keeps a long-lived stream and a server-side KV cache. The client keeps
the inputs it sent to every hop, so when a server fails, a replacement route for
that hop's blocks is given the whole history in one step and generation goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message
from trustswarm.protocol.errors import ProtocolError, SwarmError
from trustswarm.protocol.evidence import DisagreementReport, SignedExchange
from trustswarm.protocol.framing import raise_if_error, receive_message, send_message
from trustswarm.protocol.sessions import (
    SessionChain,
    SessionError,
    new_client_part,
    session_id_of,
)

from .history import GrowingHistory
from .routing import Hop
from .rpc import SpanCall, checked_statement, close_quietly, open_stream
from .swarm import SwarmClient

log = logging.getLogger("trustswarm.client")


async def open_session(
    stream: INetStream,
    call: SpanCall,
    max_length: int,
    batch_size: int,
    timeout: float,
    client_part: str | None = None,
) -> SessionChain:
    """Open an inference session on `stream` (the client's wire code, also used by
    verifier probes): send our half of the id, check the server's answer, return the
    session at step 0. Raises RemoteError for an error frame, SessionError for an
    answer that does not name a session built from our half and a server nonce."""
    part = client_part or new_client_part()
    opening = {
        "start": str(call.start),
        "end": str(call.end),
        "session_id": part,
        "max_length": str(max_length),
        "batch_size": str(batch_size),
    }
    with trio.fail_after(timeout):
        await send_message(stream, Message(meta=opening))
        answer, _ = await receive_message(stream)
    raise_if_error(answer)
    try:
        session_id = session_id_of(part, answer.field("nonce"))
    except ProtocolError as exc:
        raise SessionError(f"bad session open answer: {exc}") from None
    if answer.meta.get("opened") != session_id:
        raise SessionError("the server opened a session under another id")
    return SessionChain(session_id)


@dataclass
class _HopSession:
    call: SpanCall
    stream: INetStream
    chain: SessionChain  # the session's id, next step and the link its statement carries
    # Everything this hop's blocks have been fed so far: the replay for a replacement.
    inputs: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    # Every step as sent and answered: the evidence if an answer turns out wrong.
    transcript: list[SignedExchange] = field(default_factory=list)
    ended: bool = False  # offered for an audit (once, when its session is over)
    _inputs: GrowingHistory = field(default_factory=GrowingHistory, repr=False)
    _positions: GrowingHistory = field(default_factory=GrowingHistory, repr=False)

    @property
    def peer(self) -> str:
        return str(self.call.peer_id)

    @property
    def session_id(self) -> str:
        return self.chain.session_id

    @property
    def step(self) -> int:
        return self.chain.step

    def remember(self, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """Append a step to the replay history (client/history.py: no copy of all of it)."""
        self.inputs = self._inputs.append_to(self.inputs, hidden)
        self.positions = self._positions.append_to(self.positions, positions)


@dataclass
class InferenceSession:
    swarm: SwarmClient
    start: int
    end: int
    max_length: int
    batch_size: int
    max_failures: int = 8
    # Pinned (verifier checks): a failed step is the caller's to handle; the server is
    # not banned and no replacement replays the history.
    pinned: bool = False
    hops: list[_HopSession] = field(default_factory=list)
    length: int = 0
    mask: torch.Tensor | None = None
    failures: int = 0
    audits: int = 0  # hop transcripts of this session drawn for an audit
    # Disagreements between this session's replicas (redundant sessions only).
    disagreements: list[DisagreementReport] = field(default_factory=list)

    @property
    def timeout(self) -> float:
        return self.swarm.view.request_timeout

    def servers(self) -> list[tuple[int, int, list[str]]]:
        """(start, end, peer ids) of each span of blocks, as this session runs it now
        (one peer per hop here; a redundant session lists its replicas)."""
        return [(hop.call.start, hop.call.end, [hop.peer]) for hop in self.hops]

    async def open(self) -> None:
        self.hops = await self._open_route(self.start, self.end)

    async def open_on(self, route: Sequence[Hop]) -> None:
        """Open the session on a route the caller chose (pinned servers) instead of
        the view's best one; failover still picks replacements from the view."""
        opened: list[_HopSession] = []
        try:
            for hop in route:
                opened.append(await self._open_hop(hop))
        except BaseException:
            for h in opened:
                await close_quietly(h.stream)
            raise
        self.hops = opened

    async def close(self) -> None:
        for hop in self.hops:
            await close_quietly(hop.stream)
            self._ended(hop)
        self.hops = []

    def _ended(self, hop: _HopSession) -> None:
        """This hop's session is over (closed, failed over or outvoted): offer its
        transcript up to its last answered step for an audit (the draw happens now)."""
        if not hop.ended:
            hop.ended = True
            if self.swarm.audit(hop.transcript):
                self.audits += 1

    def client_part(self) -> str:
        """Our half of each hop's session id (the server adds the other half)."""
        return new_client_part()

    async def _open_hop(self, hop: Hop) -> _HopSession:
        peer_id = ID.from_base58(hop.server.peer_id)
        view = self.swarm.view
        call = SpanCall(
            peer_id,
            view.model_id,
            hop.start,
            hop.end,
            view.expected_digest(hop.start, hop.end),
            hop.server.dtype,
        )
        await self.swarm.ensure_connected(peer_id)
        stream = await open_stream(self.swarm.host, peer_id, protocols.INFERENCE, self.timeout)
        try:
            chain = await open_session(
                stream, call, self.max_length, self.batch_size, self.timeout, self.client_part()
            )
        except BaseException:
            await close_quietly(stream)
            raise
        return _HopSession(call, stream, chain)

    async def _open_route(self, start: int, end: int) -> list[_HopSession]:
        while True:
            route = self.swarm.view.inference_route(start, end)
            opened: list[_HopSession] = []
            try:
                for hop in route:
                    opened.append(await self._open_hop(hop))
                return opened
            except Exception as exc:
                for h in opened:
                    await close_quietly(h.stream)
                failed = route[len(opened)].server.peer_id
                self._fail(failed, f"could not open session: {exc}")

    def _fail(self, peer_id: str, reason: str) -> None:
        self.failures += 1
        self.swarm.view.ban(peer_id, reason)
        if self.failures > self.max_failures:
            raise SwarmError(
                f"inference failed after {self.failures} server failures; last: {reason}"
            )

    async def _send_step(
        self, hop: _HopSession, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        request = Message(
            tensors={"hidden_states": hidden, "position_ids": positions, "attention_mask": mask},
            meta={"session_id": hop.session_id, "step": str(hop.step)},
        )
        with trio.fail_after(self.timeout):
            raw = await send_message(hop.stream, request)
            answer, raw_answer = await receive_message(hop.stream)
        output, statement = checked_statement(
            hop.call, "inference", raw, answer, "hidden_states", hop.chain
        )
        hop.transcript.append(SignedExchange(raw, raw_answer))
        hop.chain.advance(statement)
        if output.shape != hidden.shape:
            raise SwarmError(
                f"server answered shape {list(output.shape)}, expected {list(hidden.shape)}"
            )
        return output  # in the wire dtype: votes compare what the server sent

    def _admit(self, hidden: torch.Tensor) -> torch.Tensor:
        """Check that new tokens fit in the session; float32, contiguous."""
        if self.length + hidden.shape[1] > self.max_length:
            raise SwarmError(f"session max_length {self.max_length} exceeded")
        return hidden.float().contiguous()

    async def step(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Run new tokens through all blocks. `mask` covers past and new tokens."""
        tokens = hidden.shape[1]
        hidden = await self._run_hops(0, self._admit(hidden), positions, mask)
        self.length += tokens
        return hidden

    async def _run_hops(
        self, i: int, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Send a step through hops i.. one after another (failing over as needed);
        their output. The chained session falls back to this from the hop that failed."""
        while i < len(self.hops):
            hop = self.hops[i]
            try:
                output = await self._send_step(hop, hidden, positions, mask)
            except Exception as exc:
                await close_quietly(hop.stream)
                self._ended(hop)
                if self.pinned:
                    raise
                self._fail(str(hop.call.peer_id), f"step failed: {type(exc).__name__}: {exc}")
                self.hops[i : i + 1] = await self._replace(hop, mask[:, : self.length])
                continue
            hop.remember(hidden, positions)
            hidden = output.float()
            i += 1
        return hidden

    async def _replace(self, failed: _HopSession, past_mask: torch.Tensor) -> list[_HopSession]:
        """Open a new route for the failed hop's blocks and replay its history."""
        while True:
            replacement = await self._open_route(failed.call.start, failed.call.end)
            if failed.inputs is None:
                return replacement
            hidden, positions = failed.inputs, failed.positions
            try:
                for hop in replacement:
                    output = await self._send_step(hop, hidden, positions, past_mask)
                    hop.remember(hidden, positions)
                    hidden = output.float()
                return replacement
            except Exception as exc:
                for hop in replacement:
                    await close_quietly(hop.stream)
                    self._ended(hop)
                bad = next(h for h in replacement if h.inputs is None)
                self._fail(str(bad.call.peer_id), f"history replay failed: {exc}")
