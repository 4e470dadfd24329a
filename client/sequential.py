"""Stateless forward and backward passes through a route, with retries elsewhere."""

from __future__ import annotations

import logging

import torch
from libp2p.peer.id import ID

from trustswarm.protocol import protocols
from trustswarm.protocol.errors import SwarmError

from .redundant import HopResult, RedundantSpans, backward_request, span_call
from .reference import LocalReference
from .routing import Hop
from .rpc import SpanCall, call_span
from .swarm import SwarmClient
from .vote_head import VoteHead

log = logging.getLogger("trustswarm.client")


class RemotePasses:
    """Forward and backward through the swarm; with redundancy k > 1 every span is
    computed by k distinct servers and their answers are compared (RedundantSpans)."""

    def __init__(
        self,
        swarm: SwarmClient,
        max_failures: int = 8,
        redundancy: int = 1,
        reference: LocalReference | None = None,
        head: VoteHead | None = None,
    ) -> None:
        if redundancy < 1:
            raise ValueError("redundancy must be at least 1")
        self.swarm = swarm
        self.max_failures = max_failures
        self.redundancy = redundancy
        self.reference = reference
        self.head = head

    def _redundant(self) -> RedundantSpans:
        return RedundantSpans(
            self.swarm, self.redundancy, self.max_failures, self.reference, self.head
        )

    def _call(self, hop: Hop) -> SpanCall:
        return span_call(self.swarm.view, hop.server, hop.start, hop.end)

    async def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        start: int,
        end: int,
    ) -> tuple[torch.Tensor, list[HopResult]]:
        """Run blocks [start, end); on a failure, reroute the rest from that block."""
        hidden = hidden.float().contiguous()
        if self.redundancy > 1:
            return await self._redundant().forward(hidden, positions, mask, start, end)
        results: list[HopResult] = []
        failures = 0
        block = start
        while block < end:
            hop = self.swarm.view.forward_route(block, end)[0]
            try:
                await self.swarm.ensure_connected(ID.from_base58(hop.server.peer_id))
                output, exchange = await call_span(
                    self.swarm.host,
                    self._call(hop),
                    protocols.FORWARD,
                    "forward",
                    {"hidden_states": hidden, "position_ids": positions, "attention_mask": mask},
                    "hidden_states",
                    self.swarm.view.request_timeout,
                    pool=self.swarm.streams,
                )
                if output.shape != hidden.shape:
                    raise SwarmError("answer has the wrong shape")
                self.swarm.audit((exchange,))
            except Exception as exc:
                failures += 1
                self.swarm.view.ban(hop.server.peer_id, f"forward failed: {exc}")
                if failures > self.max_failures:
                    raise SwarmError(
                        f"forward failed after {failures} server failures: {exc}"
                    ) from exc
                continue
            results.append(HopResult(hop, hidden, output.float()))
            hidden = output.float()
            block = hop.end
        return hidden, results

    async def backward(
        self,
        results: list[HopResult],
        grad: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Gradients w.r.t. the inputs, hop by hop in reverse."""
        grad = grad.float().contiguous()
        if self.redundancy > 1:
            return await self._redundant().backward(results, grad, positions, mask)
        for result in reversed(results):
            grad = await self._backward_hop(result, grad, positions, mask)
        return grad

    async def _backward_hop(
        self,
        result: HopResult,
        grad: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # Servers recompute their forward from the inputs we send and keep nothing
        # between requests, so a hop whose server died goes to another server.
        hop, failures = result.hop, 0
        while True:
            try:
                call = self._call(hop)
                await self.swarm.ensure_connected(call.peer_id)
                grad_in, exchange = await call_span(
                    self.swarm.host,
                    call,
                    protocols.BACKWARD,
                    "backward",
                    backward_request(result.inputs, grad, positions, mask),
                    "grad_inputs",
                    self.swarm.view.request_timeout,
                    pool=self.swarm.streams,
                )
                if grad_in.shape != grad.shape:
                    raise SwarmError("gradient has the wrong shape")
                self.swarm.audit((exchange,))
                return grad_in.float()
            except Exception as exc:
                failures += 1
                self.swarm.view.ban(hop.server.peer_id, f"backward failed: {exc}")
                if failures > self.max_failures:
                    raise SwarmError(f"backward failed after {failures} failures: {exc}") from exc
            route = self.swarm.view.inference_route(result.hop.start, result.hop.end)
            if len(route) == 1:
                hop = route[0]
                continue
            # No single server covers these blocks any more: re-run their forward on
            # the new route to get each sub-hop's inputs, then go back through it.
            _, sub = await self.forward(
                result.inputs, positions, mask, result.hop.start, result.hop.end
            )
            return await self.backward(sub, grad, positions, mask)
