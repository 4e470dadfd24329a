"""Inference sessions whose decode steps pass from server to server (protocol/chained.py).

The client opens every hop's session as a plain InferenceSession does. For a chained
step it sends each hop a chain frame on that hop's own stream at once: the first hop
gets the whole request, every later hop a template and the previous hop it must take
its input from. Each hop answers the client on its stream with its usual signed answer;
the client rebuilds each hop's request bytes from the template and the previous output
it checked, so every statement is checked and kept exactly as for a client-driven step.

Any failure falls back, for that step, to client-driven hops from the hop that failed
(with the usual failover and replay). Only what is provably a hop's own fault bans it:
a hop that answers nothing, or the first hop (its request came from us). A wrong answer
further along may be the previous hop's doing (it can sign two outputs for one step), so
that hop's session is replaced but the server is not banned. After `max_chain_failures`
failures the session stops chaining.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import trio

from trustswarm.protocol.chained import (
    INPUT_MISSING,
    MAX_ADDR_CHARS,
    MAX_ADDRS,
    MAX_CHAIN_TOKENS,
    MAX_FORWARD_SECONDS,
    MAX_WAIT,
    ChainFrame,
    Downstream,
    Upstream,
    encode_chain_frame,
    splice_hidden,
)
from trustswarm.protocol.codec import Message, encode_message
from trustswarm.protocol.errors import BUSY, ProtocolError, RemoteError, SwarmError
from trustswarm.protocol.evidence import SignedExchange
from trustswarm.protocol.framing import receive_message, write_frame

from .rpc import InvalidAnswer, checked_statement, close_quietly
from .session import InferenceSession, _HopSession

log = logging.getLogger("trustswarm.client")

CHAIN_WAIT = 5.0  # seconds a hop waits for its input before answering "input missing"


@dataclass(frozen=True)
class ChainFailure:
    """A chained step that fell back: which hop (index on the route) and why."""

    length: int  # the session's length (tokens) before the step
    hop: int
    peer: str
    reason: str


@dataclass
class ChainedInferenceSession(InferenceSession):
    # Steps of more tokens (prefills) go hop by hop: their compute dwarfs a round trip.
    chain_max_tokens: int = 16
    max_chain_failures: int = 2
    chain_failures: list[ChainFailure] = field(default_factory=list)
    chained_steps: int = 0

    @property
    def chain_wait(self) -> float:
        return min(CHAIN_WAIT, self.timeout, MAX_WAIT)

    @property
    def answer_timeout(self) -> float:
        """How long a hop may take to answer a chain frame: its wait for the input, a
        step, and a forward of its previous step that may still hold its session."""
        return self.chain_wait + self.timeout + MAX_FORWARD_SECONDS

    def _chainable(self, hidden: torch.Tensor) -> bool:
        return (
            len(self.hops) > 1
            and not self.pinned
            and hidden.shape[1] <= min(self.chain_max_tokens, MAX_CHAIN_TOKENS)
            and len(self.chain_failures) < self.max_chain_failures
            and all(h.peer in self.swarm.view.servers for h in self.hops)
        )

    async def step(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if not self._chainable(hidden):
            return await super().step(hidden, positions, mask)
        tokens = hidden.shape[1]
        output = await self._chained_step(self._admit(hidden), positions, mask)
        self.length += tokens
        return output

    def _frame(self, hops: list[_HopSession], i: int, request: bytes) -> bytes:
        upstream = downstream = None
        if i > 0:
            up = hops[i - 1]
            upstream = Upstream(up.peer, up.session_id, up.step)
        if i + 1 < len(hops):
            down = hops[i + 1]
            announced = self.swarm.view.servers[down.peer].addrs
            addrs = tuple(a for a in announced if len(a) <= MAX_ADDR_CHARS)[:MAX_ADDRS]
            downstream = Downstream(down.peer, addrs, down.session_id, down.step)
        return encode_chain_frame(ChainFrame(self.chain_wait, upstream, downstream, request))

    async def _chained_step(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        hops = list(self.hops)
        requests = [
            _step_request(hop, hidden if i == 0 else torch.zeros_like(hidden), positions, mask)
            for i, hop in enumerate(hops)
        ]
        try:
            frames = [self._frame(hops, i, request) for i, request in enumerate(requests)]
        except (ProtocolError, KeyError) as exc:  # ours (a view without addresses): no hop's
            log.info("step not chained: %s", exc)
            return await self._run_hops(0, hidden, positions, mask)
        # Last hop first: if a send fails, no hop before it has started the chain, so
        # the step runs client-driven from the first hop.
        for i in reversed(range(len(hops))):
            try:
                with trio.fail_after(self.timeout):
                    await write_frame(hops[i].stream, frames[i])
            except Exception as exc:
                return await self._fall_back(hops, i, exc, 0, hidden, positions, mask)
        current = hidden
        for i, hop in enumerate(hops):
            try:
                raw = requests[0] if i == 0 else splice_hidden(requests[i], current)
                with trio.fail_after(self.answer_timeout):
                    answer, raw_answer = await receive_message(hop.stream)
                output, statement = checked_statement(
                    hop.call, "inference", raw, answer, "hidden_states", hop.chain
                )
                if output.shape != hidden.shape:
                    raise InvalidAnswer(f"answered shape {list(output.shape)}")
            except Exception as exc:
                return await self._fall_back(hops, i, exc, i, current, positions, mask)
            hop.transcript.append(SignedExchange(raw, raw_answer))
            hop.chain.advance(statement)
            hop.remember(current, positions)
            current = output.float()
        self.chained_steps += 1
        return current

    async def _fall_back(
        self,
        hops: list[_HopSession],
        i: int,
        exc: Exception,
        resume: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Hop i failed the chained step: settle every hop from i on (in sync, replaced
        or failed over), then run the step client-driven from hop `resume` (i, or the
        first hop if the chain never started) with `hidden`, that hop's input."""
        reason = f"{type(exc).__name__}: {exc}"
        self.chain_failures.append(ChainFailure(self.length, i, hops[i].peer, reason))
        log.warning("chained step failed at hop %d (%s): %s", i, hops[i].peer, reason)
        verdicts = {i: _verdict_of(exc, first=i == 0)}
        for j in range(i + 1, len(hops)):
            verdicts[j] = await self._drain(hops[j])
        for j in sorted(verdicts, reverse=True):  # replacing keeps earlier indices valid
            if verdicts[j] != "in_sync":
                await self._reopen(j, verdicts[j], reason, mask)
        return await self._run_hops(resume, hidden, positions, mask)

    async def _drain(self, hop: _HopSession) -> str:
        """A later hop's answer to a chain frame whose input may never come."""
        try:
            with trio.fail_after(self.answer_timeout):
                answer, _ = await receive_message(hop.stream)
        except Exception:
            return "failed"  # it owed us an answer
        if _input_missing(answer.meta.get("error"), answer.meta.get("message", "")):
            return "in_sync"
        return "replace"  # it ran the step on an input we did not accept, or refused

    async def _reopen(self, index: int, verdict: str, reason: str, mask: torch.Tensor) -> None:
        hop = self.hops[index]
        await close_quietly(hop.stream)
        self._ended(hop)
        if verdict == "failed":
            self._fail(hop.peer, f"chained step failed: {reason}")
        self.hops[index : index + 1] = await self._replace(hop, mask[:, : self.length])


def _input_missing(code: str | None, message: str) -> bool:
    return code == BUSY and INPUT_MISSING in message


def _verdict_of(exc: Exception, first: bool) -> str:
    """in_sync: the hop's session did not move (its input never came); replace: its
    session is not usable but the fault may be the previous hop's; failed: its own."""
    if isinstance(exc, RemoteError) and _input_missing(exc.code, exc.message):
        return "in_sync"
    if isinstance(exc, RemoteError | InvalidAnswer | SwarmError) and not first:
        return "replace"
    return "failed"


def _step_request(
    hop: _HopSession, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
) -> bytes:
    """A hop's step request as a client-driven step sends it (with zeros for hidden_states
    in a template)."""
    return encode_message(
        Message(
            tensors={"hidden_states": hidden, "position_ids": positions, "attention_mask": mask},
            meta={"session_id": hop.session_id, "step": str(hop.step)},
        )
    )
