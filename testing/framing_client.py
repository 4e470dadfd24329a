"""Testing only: a client that frames an honest server with its own signed answers.

`FramingClient` sends framing inputs (testing/framing.py) to a live server through the
client library, once as a forward request (`call_span`) and once as a one-step
inference session (`open_session`, then a step checked by `checked_statement`), keeps
each signed answer as evidence, wraps it as a `DisagreementReport` that puts the
server alone in a losing cluster, sends it to a verifier (`send_report`) and returns
the verdicts. Every request is one a real client may send; every answer it reports
was honestly computed and validly signed: an upheld verdict bans an honest server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import torch
import trio
from libp2p.abc import IHost

from trustswarm.client.reports import ReportVerdict, send_report
from trustswarm.client.rpc import SpanCall, call_span, checked_statement, close_quietly, open_stream
from trustswarm.client.session import open_session
from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message
from trustswarm.protocol.errors import TrustswarmError
from trustswarm.protocol.evidence import (
    DisagreementReport,
    Evidence,
    ReplicaAnswer,
    SignedExchange,
)
from trustswarm.protocol.framing import receive_message, send_message
from trustswarm.protocol.identity import Identity, parse_peer_id
from trustswarm.protocol.info import call_info
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host

from .framing import FramingInput

KINDS = ("forward", "inference")


@dataclass(frozen=True)
class FramingTarget:
    """A live server: its peer id and full addresses (…/p2p/<peer id>)."""

    peer_id: str
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class FramingOutcome:
    label: str  # the input's label
    objective: str
    kind: str  # forward | inference
    verdict: ReportVerdict | None  # None: no signed answer to report (see `error`)
    error: str = ""

    @property
    def banned(self) -> bool:
        return self.verdict is not None and self.verdict.upheld


async def span_call(
    host: IHost,
    target: FramingTarget,
    span: tuple[int, int] | None = None,
    span_digest: Callable[[int, int], str] | None = None,
    timeout: float = 60.0,
) -> SpanCall:
    """Connect to `target` and build the call a client makes from its announcement, for
    `span` (default the announced one; a sub-span needs the manifest's `span_digest`)."""
    peer_id = parse_peer_id(target.peer_id)
    with trio.fail_after(timeout):
        await host.connect(parse_peer_addr(target.addrs[0]))
    announced = (await call_info(host, peer_id, timeout)).announcement.announcement
    start, end = span or (announced.start, announced.end)
    digest = announced.weights_digest
    if (start, end) != (announced.start, announced.end):
        if span_digest is None or not announced.start <= start < end <= announced.end:
            raise TrustswarmError(f"cannot ask {start}:{end} of this server")
        digest = span_digest(start, end)
    return SpanCall(peer_id, announced.model_id, start, end, digest, announced.dtype)


async def ask_forward(
    host: IHost, call: SpanCall, hidden: torch.Tensor, positions: torch.Tensor, timeout: float
) -> SignedExchange:
    """One forward request through `call_span` (which checks the signed answer)."""
    tensors = {"hidden_states": hidden.float().contiguous(), "position_ids": positions}
    _, exchange = await call_span(
        host, call, protocols.FORWARD, "forward", tensors, "hidden_states", timeout
    )
    return exchange


async def ask_session(
    host: IHost, call: SpanCall, hidden: torch.Tensor, positions: torch.Tensor, timeout: float
) -> SignedExchange:
    """An inference session whose prefill is `hidden`: its one step's exchange, checked
    as a client checks it (`checked_statement`)."""
    tokens = hidden.shape[1]
    stream = await open_stream(host, call.peer_id, protocols.INFERENCE, timeout)
    try:
        chain = await open_session(stream, call, tokens, 1, timeout)
        request = Message(
            tensors={
                "hidden_states": hidden.float().contiguous(),
                "position_ids": positions,
                "attention_mask": torch.ones(1, tokens, dtype=torch.long),
            },
            meta={"session_id": chain.session_id, "step": str(chain.step)},
        )
        with trio.fail_after(timeout):
            raw = await send_message(stream, request)
            answer, raw_answer = await receive_message(stream)
        checked_statement(call, "inference", raw, answer, "hidden_states", chain)
    finally:
        await close_quietly(stream)
    return SignedExchange(raw, raw_answer)


@dataclass
class _Reporters:
    """Reporting hosts, a new identity every `per_identity` reports (a verifier rate-limits
    each reporter peer id). Hosts stay up until `stack` closes: py-libp2p leaves a closed
    host's TCP connections open in-process, so a host per report would fill a verifier's
    inbound connection slots after a few hundred reports."""

    stack: AsyncExitStack
    per_identity: int
    host: IHost | None = None
    sent: int = 0

    async def next(self) -> IHost:
        if self.host is None or self.sent >= self.per_identity:
            self.host = make_host(Identity.generate())
            await self.stack.enter_async_context(running_host(self.host, []))
            self.sent = 0
        self.sent += 1
        return self.host


@dataclass
class FramingClient:
    """Frames `target` in front of the verifier at `verifier_addr` (a full multiaddr).
    Reports go out under a new identity every `reports_per_identity` reports (under a
    verifier's default rate limit of 10 per reporter a minute). With `span_digest` (the
    manifest's) it can ask a sub-span of the server's span."""

    verifier_addr: str
    timeout: float = 60.0
    span_digest: Callable[[int, int], str] | None = None
    kinds: tuple[str, ...] = KINDS
    reports_per_identity: int = 8
    reports: list[DisagreementReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.kinds or not set(self.kinds) <= set(KINDS):
            raise TrustswarmError(f"kinds must be a non-empty subset of {KINDS}")
        if self.reports_per_identity < 1:
            raise TrustswarmError("reports_per_identity must be >= 1")
        parse_peer_addr(self.verifier_addr)  # a full address, or ProtocolError now

    async def frame(
        self,
        target: FramingTarget,
        inputs: Sequence[FramingInput],
        span: tuple[int, int] | None = None,
    ) -> list[FramingOutcome]:
        """Ask `target` for each input (on `span`, default the span it announces), report
        every signed answer, return one outcome per (input, kind). One asking host per
        call; reporting hosts as `_Reporters` says."""
        host = make_host(Identity.generate())
        outcomes: list[FramingOutcome] = []
        async with running_host(host, []), AsyncExitStack() as stack:
            reporters = _Reporters(stack, self.reports_per_identity)
            call = await span_call(host, target, span, self.span_digest, self.timeout)
            for item in inputs:
                for kind in self.kinds:
                    outcomes.append(await self._one(host, reporters, call, item, kind))
        return outcomes

    async def _one(
        self, host: IHost, reporters: _Reporters, call: SpanCall, item: FramingInput, kind: str
    ) -> FramingOutcome:
        try:
            ask = ask_forward if kind == "forward" else ask_session
            exchange = await ask(host, call, item.hidden, item.positions, self.timeout)
        except (TrustswarmError, trio.TooSlowError) as exc:
            return FramingOutcome(item.label, item.objective, kind, None, f"no answer: {exc}")
        report = self.report(call, kind, Evidence((exchange,)), item)
        self.reports.append(report)
        reporter = await reporters.next()
        verdict = await send_report(reporter, self.verifier_addr, report, self.timeout)
        return FramingOutcome(item.label, item.objective, kind, verdict)

    @staticmethod
    def report(
        call: SpanCall, kind: str, evidence: Evidence, item: FramingInput
    ) -> DisagreementReport:
        """The accusation: the server's answer alone in cluster 1, a claimed majority 0."""
        return DisagreementReport(
            model_id=call.model_id,
            start=call.start,
            end=call.end,
            kind=kind,
            answers=(ReplicaAnswer(str(call.peer_id), evidence, 1),),
            accepted_cluster=0,
            resolution="majority",
            detail=f"replicas disagreed ({item.objective}: {item.label})",
        )
