"""Inference sessions with redundancy: every segment of blocks runs on k replicas.

Each replica keeps its own server-side KV cache. All replicas of a segment are fed
the same agreed inputs, which the group remembers; a replica that fails or loses a
vote is replaced by a fresh server that first replays that history (one step), then
answers the current step like the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trustswarm.protocol.errors import SwarmError
from trustswarm.protocol.evidence import DisagreementReport, Evidence

from .agreement import Answer, RedundantCall
from .history import GrowingHistory
from .redundant import choose_replicas
from .reference import LocalReference
from .routing import Hop
from .rpc import close_quietly
from .session import InferenceSession, _HopSession
from .vote_head import VoteHead

# Cuts of the blocks tried when opening (servers that fail are banned between tries).
OPEN_ATTEMPTS = 3


@dataclass
class _ReplicaGroup:
    start: int
    end: int
    replicas: list[_HopSession]
    inputs: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    _inputs: GrowingHistory = field(default_factory=GrowingHistory, repr=False)
    _positions: GrowingHistory = field(default_factory=GrowingHistory, repr=False)

    def remember(self, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """Append a step to the group's history (client/history.py: no copy of all of it)."""
        self.inputs = self._inputs.append_to(self.inputs, hidden)
        self.positions = self._positions.append_to(self.positions, positions)


@dataclass
class RedundantInferenceSession(InferenceSession):
    redundancy: int = 2
    reference: LocalReference | None = None  # the client's own blocks, the tie-breaker
    head: VoteHead | None = None  # votes on the last span also compare next-token logits
    groups: list[_ReplicaGroup] = field(default_factory=list)

    async def open(self) -> None:
        """Open k replicas for every segment. A segment whose servers fail to open (they
        are banned for it) is not the end: the blocks are cut again over the servers
        left, e.g. two shorter segments where one long one no longer has k servers."""
        for attempt in range(OPEN_ATTEMPTS):
            short = await self._open_groups()
            if short is None:
                return
            await self.close()
            if attempt == OPEN_ATTEMPTS - 1:
                raise SwarmError(
                    f"redundancy={self.redundancy}: only {short[2]} servers could open a "
                    f"session for blocks {short[0]}:{short[1]}"
                )

    async def _open_groups(self) -> tuple[int, int, int] | None:
        """Fill every segment; None, or (start, end, replicas opened) of one left short."""
        view = self.swarm.view
        for start, end in view.segments(self.start, self.end, self.redundancy):
            group = _ReplicaGroup(start, end, [])
            self.groups.append(group)
            while len(group.replicas) < self.redundancy:
                replica = await self._spare(group, None, {h.peer for h in group.replicas})
                if replica is None:
                    return start, end, len(group.replicas)
                group.replicas.append(replica)
        return None

    def servers(self) -> list[tuple[int, int, list[str]]]:
        return [(g.start, g.end, [r.peer for r in g.replicas]) for g in self.groups]

    def _report(self, report: DisagreementReport) -> None:
        self.disagreements.append(report)
        self.swarm.view.report_disagreement(report)

    async def close(self) -> None:
        for group in self.groups:
            for replica in group.replicas:
                await close_quietly(replica.stream)
                self._ended(replica)
        self.groups = []

    async def _spare(
        self, group: _ReplicaGroup, past_mask: torch.Tensor | None, asked: set[str]
    ) -> _HopSession | None:
        """Open a session on a server not in `asked` and replay the group's history.
        Servers that fail to open or replay are banned; None when none is left."""
        view = self.swarm.view
        while True:
            chosen = choose_replicas(view, group.start, group.end, 1, asked, self.redundancy)
            if not chosen:
                return None
            server = chosen[0]
            asked.add(server.peer_id)
            replica: _HopSession | None = None
            try:
                replica = await self._open_hop(Hop(server, group.start, group.end))
                if group.inputs is not None and past_mask is not None:
                    await self._send_step(replica, group.inputs, group.positions, past_mask)
                return replica
            except Exception as exc:
                if replica is not None:
                    await close_quietly(replica.stream)
                    self._ended(replica)
                self._fail(server.peer_id, f"could not open a replica: {exc}")

    async def step(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        tokens = hidden.shape[1]
        hidden = self._admit(hidden)
        past_mask = mask[:, : self.length]
        for group in self.groups:
            hidden = await self._step_group(group, hidden, positions, mask, past_mask)
        self.length += tokens
        return hidden

    async def _step_group(
        self,
        group: _ReplicaGroup,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        past_mask: torch.Tensor,
    ) -> torch.Tensor:
        async def ask(replica: _HopSession) -> Answer:
            output = await self._send_step(replica, hidden, positions, mask)
            return Answer(replica.peer, output, Evidence(tuple(replica.transcript)))

        async def spare(asked: set[str]) -> _HopSession | None:
            return await self._spare(group, past_mask, asked)

        async def local() -> torch.Tensor:
            inputs, past = group.inputs, group.positions
            full = hidden if inputs is None else torch.cat([inputs, hidden], dim=1)
            full_positions = positions if past is None else torch.cat([past, positions], dim=1)
            output = await self.reference.forward(
                group.start, group.end, full, full_positions, mask
            )
            return output[:, -hidden.shape[1] :]

        def fail(replica: _HopSession, exc: Exception) -> None:
            self._fail(replica.peer, f"step failed: {type(exc).__name__}: {exc}")

        call = RedundantCall[_HopSession](
            k=self.redundancy,
            kind="inference",
            model_id=self.swarm.view.model_id,
            start=group.start,
            end=group.end,
            peer_of=lambda r: r.peer,
            ask=ask,
            spare=spare,
            fail=fail,
            report=self._report,
            logits=self.head.for_span(group.end) if self.head is not None else None,
            local=local
            if self.reference is not None and self.reference.has(group.start, group.end)
            else None,
        )
        outcome = await call.run(list(group.replicas))
        for replica in outcome.dropped:
            await close_quietly(replica.stream)
            self._ended(replica)
        # Replicas that answered and agreed go on; failed or outvoted ones are replaced
        # at the next step (RedundantCall tops the group up to k first).
        group.replicas = outcome.kept
        group.remember(hidden, positions)
        return outcome.output
