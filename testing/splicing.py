"""Testing only: a client that splices genuinely signed inference steps into false fraud
reports, the attack issue 10 measured against the verifier.

It is built from the project's own client classes (SwarmClient, InferenceSession,
send_report) and used by tests/test_splicing.py; nothing in the client package or any
command imports it. It opens sessions on honest servers, always asking for the same
client part of the session id (so that, before servers drew half of every id, two
sessions shared one), records every request and signed answer, then recombines them:

* ``same id, other run``: step 0 of one session, step 1 of another of the same server
  with the same client part and prompts of equal length (the measured attack);
* ``spliced tail``: steps 0-1 of one session, step 2 of the other;
* ``reordered``: steps 1, 0 of one session;
* ``middle step dropped``: steps 0, 2 of one session;
* ``not from step 0``: steps 1, 2 of one session;
* ``two servers``: step 0 from one server, step 1 from another, same client part.

Each goes to a verifier as a DisagreementReport accusing the last step's signer.
Every one must be rejected as evidence; the genuine transcript (``genuine``) must be
judged, and an honest server's answers agree with the reference.

`repeating_nonce_server_cls` is an honest server that draws the same nonce for every
session, so two sessions do share an id: against it only the hash chain tells
spliced steps apart (the situation before servers drew half of every id).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
import trio

from trustswarm.client.reports import ReportVerdict, send_report
from trustswarm.client.routing import Hop
from trustswarm.client.session import InferenceSession
from trustswarm.client.swarm import SwarmClient, SwarmView
from trustswarm.models.store import ModelDir
from trustswarm.node.handlers import ServingContext
from trustswarm.node.server import BlockServer
from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.evidence import (
    DisagreementReport,
    Evidence,
    ReplicaAnswer,
    SignedExchange,
)
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host
from trustswarm.testing.adversary import derived_context

CLIENT_PART = "splicing-client-0001"


@dataclass
class _RepeatingNonceContext(ServingContext):
    def session_nonce(self) -> str:
        return "0" * 32


def repeating_nonce_server_cls() -> type[BlockServer]:
    """An honest BlockServer whose every session gets the same nonce (for tests)."""

    class RepeatingNonceServer(BlockServer):
        def _make_context(self) -> ServingContext:
            return derived_context(super()._make_context(), _RepeatingNonceContext)

    return RepeatingNonceServer


@dataclass
class _SamePartSession(InferenceSession):
    """An inference session that asks every server for the same client part of its id."""

    fixed_part: str = CLIENT_PART

    def client_part(self) -> str:
        return self.fixed_part


@dataclass(frozen=True)
class RecordedSession:
    server: Announcement
    session_id: str  # what the server made of our fixed client part
    exchanges: tuple[SignedExchange, ...]  # every step as sent and answered


@dataclass(frozen=True)
class Splice:
    name: str
    exchanges: tuple[SignedExchange, ...]
    spliced: bool  # False: a real session's transcript, unchanged


@dataclass(frozen=True)
class SpliceResult:
    name: str
    spliced: bool
    verdict: ReportVerdict


def splices(a: RecordedSession, b: RecordedSession, other: RecordedSession) -> list[Splice]:
    """`a` and `b`: two sessions of one server (3 steps each, prompts of equal length);
    `other`: a session of another server."""
    x, y, z = a.exchanges, b.exchanges, other.exchanges
    return [
        Splice("genuine", (x[0], x[1], x[2]), False),
        Splice("same id, other run", (x[0], y[1]), True),
        Splice("spliced tail", (x[0], x[1], y[2]), True),
        Splice("reordered", (x[1], x[0]), True),
        Splice("middle step dropped", (x[0], x[2]), True),
        Splice("not from step 0", (x[1], x[2]), True),
        Splice("two servers", (x[0], z[1]), True),
    ]


def accusation(
    model_id: str, start: int, end: int, exchanges: Sequence[SignedExchange]
) -> DisagreementReport:
    """A report that says a majority outvoted the transcript's signer."""
    evidence = Evidence(tuple(exchanges))
    return DisagreementReport(
        model_id=model_id,
        start=start,
        end=end,
        kind="inference",
        answers=(ReplicaAnswer(evidence.signer, evidence, 1),),
        accepted_cluster=0,
        resolution="majority",
        detail="spliced by trustswarm.testing.splicing",
    )


class SplicingClient:
    def __init__(self, swarm: SwarmClient, hidden_size: int, seed: int = 0) -> None:
        self.swarm = swarm
        self.hidden_size = hidden_size
        self.seed = seed

    async def record(
        self, server: Announcement, start: int, end: int, prompt_tokens: int, seed: int
    ) -> RecordedSession:
        """A prefill of `prompt_tokens` random hidden states and two 1-token steps on
        `server`, every answer checked as any client checks it."""
        session = _SamePartSession(self.swarm, start, end, prompt_tokens + 2, 1)
        await session.open_on([Hop(server, start, end)])
        gen = torch.Generator().manual_seed(seed)
        try:
            for tokens in (prompt_tokens, 1, 1):
                hidden = torch.randn(1, tokens, self.hidden_size, generator=gen)
                positions = torch.arange(session.length, session.length + tokens).unsqueeze(0)
                mask = torch.ones(1, session.length + tokens, dtype=torch.long)
                await session.step(hidden, positions, mask)
            (hop,) = session.hops
            return RecordedSession(server, hop.session_id, tuple(hop.transcript))
        finally:
            await session.close()

    async def attack(
        self, target: Announcement, other: Announcement, start: int, end: int, verifier: str
    ) -> tuple[list[RecordedSession], list[SpliceResult]]:
        """Record two sessions on `target` and one on `other` (all with our fixed client
        part), report every splice to `verifier` (a multiaddr); the sessions and verdicts."""
        a = await self.record(target, start, end, 4, self.seed)
        b = await self.record(target, start, end, 4, self.seed + 1)
        c = await self.record(other, start, end, 4, self.seed + 2)
        results = []
        for splice in splices(a, b, c):
            report = accusation(self.swarm.view.model_id, start, end, splice.exchanges)
            verdict = await send_report(self.swarm.host, verifier, report)
            results.append(SpliceResult(splice.name, splice.spliced, verdict))
        return [a, b, c], results


@asynccontextmanager
async def splicing_client(
    model_dir: ModelDir, initial_peers: Sequence[str], seed: int = 0
) -> AsyncIterator[SplicingClient]:
    """A SplicingClient on a fresh identity, joined to the swarm at `initial_peers`."""
    manifest = model_dir.manifest
    view = SwarmView(model_id=manifest.model_id, span_digest=manifest.span_digest)
    swarm = SwarmClient(make_host(Identity.generate()), view, initial_peers)
    async with trio.open_nursery() as nursery:
        await nursery.start(swarm.run)
        yield SplicingClient(swarm, model_dir.config.hidden_size, seed)
        nursery.cancel_scope.cancel()
