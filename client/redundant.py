"""Stateless forward and backward with redundancy: k servers per span, compared."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import torch
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from trustswarm.protocol import protocols
from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.errors import SwarmError
from trustswarm.protocol.evidence import Evidence

from .agreement import Answer, RedundantCall
from .reference import LocalReference
from .replicas import hosts_of, pick, vote_dtypes
from .routing import Hop
from .rpc import SpanCall, call_span
from .swarm import SwarmClient, SwarmView
from .vote_head import VoteHead


@dataclass(frozen=True)
class HopResult:
    hop: Hop
    inputs: torch.Tensor
    output: torch.Tensor


def span_call(view: SwarmView, server: Announcement, start: int, end: int) -> SpanCall:
    return SpanCall(
        ID.from_base58(server.peer_id),
        view.model_id,
        start,
        end,
        view.expected_digest(start, end),
        server.dtype,
    )


def choose_replicas(
    view: SwarmView,
    start: int,
    end: int,
    count: int,
    exclude: set[str],
    vote_size: int | None = None,
) -> list[Announcement]:
    """Up to `count` usable servers for [start, end) not in `exclude`, avoiding the hosts
    of the excluded (already chosen) ones, ranked by latency and reputation. Established
    servers of one announced dtype when there are enough (the dtype of the answers
    already given, for a spare); else established servers first, of any dtype.
    `vote_size`: the replicas the vote will have in all, when they are chosen one by one."""
    taken = [view.servers[p] for p in exclude if p in view.servers]
    usable = view.usable(tuple(exclude))
    established = view.established(usable)
    needed = max(count, (vote_size or 0) - len(taken))
    for dtype in vote_dtypes(established, start, end, needed, {s.dtype for s in taken}):
        chosen = _pick_tiers(
            view, [[s for s in established if s.dtype == dtype]], taken, start, end, count
        )
        if len(chosen) == count:
            return chosen
    # Established servers first (see SwarmView._tiered), then servers on probation.
    return _pick_tiers(view, [established, usable], taken, start, end, count)


def _pick_tiers(
    view: SwarmView,
    tiers: list[list[Announcement]],
    taken: list[Announcement],
    start: int,
    end: int,
    count: int,
) -> list[Announcement]:
    chosen: list[Announcement] = []
    for tier in tiers:
        chosen += pick(
            [s for s in tier if s not in chosen],
            start,
            end,
            count - len(chosen),
            avoid_hosts=set().union(*(hosts_of(s, view.observed) for s in taken + chosen)),
            rtts=view.rtts,
            penalty=view.trust.route_penalty if view.trust is not None else None,
            observed=view.observed,
        )
        if len(chosen) == count:
            break
    return chosen


def backward_request(
    inputs: torch.Tensor, grad: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    return {
        "hidden_states": inputs,
        "grad_outputs": grad,
        "position_ids": positions,
        "attention_mask": mask,
    }


class RedundantSpans:
    def __init__(
        self,
        swarm: SwarmClient,
        k: int,
        max_failures: int = 8,
        reference: LocalReference | None = None,
        head: VoteHead | None = None,
    ) -> None:
        self.swarm = swarm
        self.k = k
        self.max_failures = max_failures
        self.failures = 0
        self.reference = reference
        self.head = head  # votes on the last span also compare next-token logits

    @property
    def view(self) -> SwarmView:
        return self.swarm.view

    def _fail(self, server: Announcement, exc: Exception) -> None:
        self.failures += 1
        self.view.ban(server.peer_id, f"{type(exc).__name__}: {exc}")
        if self.failures > self.max_failures:
            raise SwarmError(f"gave up after {self.failures} server failures; last: {exc}")

    def _choose(self, start: int, end: int, count: int, exclude: set[str]) -> list[Announcement]:
        return choose_replicas(self.view, start, end, count, exclude)

    async def _call(
        self,
        kind: str,
        protocol: TProtocol,
        start: int,
        end: int,
        tensors: dict[str, torch.Tensor | None],
        answer_name: str,
        expected_shape: torch.Size,
        local: Callable[[], Awaitable[torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, Announcement]:
        async def ask(server: Announcement) -> Answer:
            call = span_call(self.view, server, start, end)
            await self.swarm.ensure_connected(call.peer_id)
            output, exchange = await call_span(
                self.swarm.host,
                call,
                protocol,
                kind,
                tensors,
                answer_name,
                self.view.request_timeout,
                pool=self.swarm.streams,
            )
            if output.shape != expected_shape:
                raise SwarmError(f"answer shape {list(output.shape)} != {list(expected_shape)}")
            self.swarm.audit((exchange,))  # drawn now, before any vote
            return Answer(server.peer_id, output, Evidence((exchange,)))

        async def spare(asked: set[str]) -> Announcement | None:
            chosen = self._choose(start, end, 1, asked)
            return chosen[0] if chosen else None

        call = RedundantCall[Announcement](
            k=self.k,
            kind=kind,
            model_id=self.view.model_id,
            start=start,
            end=end,
            peer_of=lambda s: s.peer_id,
            ask=ask,
            spare=spare,
            fail=self._fail,
            report=self.view.report_disagreement,
            local=local if self.reference is not None and self.reference.has(start, end) else None,
            logits=self.head.for_span(end) if self.head is not None else None,
        )
        outcome = await call.run(self._choose(start, end, self.k, set()))
        return outcome.output, (outcome.kept or outcome.dropped)[0]

    async def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        start: int,
        end: int,
    ) -> tuple[torch.Tensor, list[HopResult]]:
        results: list[HopResult] = []
        for a, b in self.view.segments(start, end, self.k):
            output, server = await self._call(
                "forward",
                protocols.FORWARD,
                a,
                b,
                {"hidden_states": hidden, "position_ids": positions, "attention_mask": mask},
                "hidden_states",
                hidden.shape,
                partial(self._local_forward, a, b, hidden, positions, mask),
            )
            results.append(HopResult(Hop(server, a, b), hidden, output))
            hidden = output
        return hidden, results

    async def backward(
        self,
        results: list[HopResult],
        grad: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        for result in reversed(results):
            grad, _ = await self._call(
                "backward",
                protocols.BACKWARD,
                result.hop.start,
                result.hop.end,
                backward_request(result.inputs, grad, positions, mask),
                "grad_inputs",
                grad.shape,
                partial(
                    self._local_backward,
                    result.hop.start,
                    result.hop.end,
                    result.inputs,
                    grad,
                    positions,
                    mask,
                ),
            )
        return grad

    async def _local_forward(self, *args: object) -> torch.Tensor:
        return await self.reference.forward(*args)

    async def _local_backward(self, *args: object) -> torch.Tensor:
        return await self.reference.backward(*args)
