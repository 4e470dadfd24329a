"""One redundant call: ask k replicas, cluster their answers, escalate, keep the evidence.

The value accepted is the one a quorum (strict majority of k) of distinct servers
agree on within the comparator's tolerance, and only if no other cluster is as large.
Without such a majority the client asks more servers, one at a time; if that does not
settle it and the client holds the reference blocks, it recomputes locally. It never
silently picks one answer: an unresolved call raises DisagreementError with the report.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import trio

from trustswarm.protocol.codec import dtype_name
from trustswarm.protocol.comparator import Verdict, compare
from trustswarm.protocol.errors import SwarmError
from trustswarm.protocol.evidence import DisagreementReport, Evidence, ReplicaAnswer
from trustswarm.protocol.next_token import compare_next_token, next_token_tolerance

from .replicas import quorum

log = logging.getLogger("trustswarm.client")

R = TypeVar("R")


class DisagreementError(SwarmError):
    """Replicas disagreed and no value won; `report` holds the evidence."""

    def __init__(self, message: str, report: DisagreementReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Answer:
    peer_id: str
    output: torch.Tensor
    evidence: Evidence


@dataclass(frozen=True)
class Decision:
    clusters: list[int]  # cluster number of each answer, in order
    winner: int | None


Logits = Callable[[torch.Tensor], torch.Tensor]


def agreement(
    a: torch.Tensor,
    b: torch.Tensor,
    kind: str,
    logits_a: torch.Tensor | None = None,
    logits_b: torch.Tensor | None = None,
) -> Verdict:
    """The hidden-state comparator; where the next-token logits of both answers are known
    (a span ending at the last block, with the client's own LM head), also the next-token
    comparator: replicas that lead to different next tokens beyond a near-tie disagree."""
    verdict = compare(a, b, kind=kind)
    if not verdict.agree or logits_a is None or logits_b is None:
        return verdict
    tolerance = next_token_tolerance(dtype_name(a.dtype), dtype_name(b.dtype))
    return compare_next_token(logits_a, logits_b, tolerance)


def agreeing(
    a: torch.Tensor,
    b: torch.Tensor,
    kind: str,
    logits_a: torch.Tensor | None = None,
    logits_b: torch.Tensor | None = None,
) -> bool:
    return agreement(a, b, kind, logits_a, logits_b).agree


def cluster(outputs: Sequence[torch.Tensor], kind: str, logits: Logits | None = None) -> list[int]:
    """Greedy clustering: each output joins the first cluster whose first member it
    agrees with (the comparator is not transitive; the first member anchors)."""
    heads = [logits(o) if logits is not None and kind == "hidden" else None for o in outputs]
    anchors: list[int] = []
    numbers: list[int] = []
    for j, output in enumerate(outputs):
        for i, anchor in enumerate(anchors):
            if agreeing(outputs[anchor], output, kind, heads[anchor], heads[j]):
                numbers.append(i)
                break
        else:
            anchors.append(j)
            numbers.append(len(anchors) - 1)
    return numbers


def decide(
    outputs: Sequence[torch.Tensor], k: int, kind: str, logits: Logits | None = None
) -> Decision:
    """The winning cluster: at least quorum(k) members and strictly larger than any other."""
    numbers = cluster(outputs, kind, logits)
    sizes = Counter(numbers).most_common()
    if not sizes:
        return Decision(numbers, None)
    best, size = sizes[0]
    runner_up = sizes[1][1] if len(sizes) > 1 else 0
    winner = best if size >= quorum(k) and size > runner_up else None
    return Decision(numbers, winner)


def preferred(answers: Sequence[Answer]) -> Answer:
    """Within agreeing answers, continue with the most precise one (float32 over bf16)."""
    return max(answers, key=lambda a: torch.finfo(a.output.dtype).bits)


@dataclass
class Outcome(Generic[R]):
    output: torch.Tensor
    kept: list[R]  # replicas whose answers won
    dropped: list[R]  # replicas that failed or lost (banned by the caller's hooks)
    report: DisagreementReport | None


@dataclass
class RedundantCall(Generic[R]):
    """The hooks one kind of call provides; `run` does the rest."""

    k: int
    kind: str  # forward | inference | backward (the statement kind)
    model_id: str
    start: int
    end: int
    peer_of: Callable[[R], str]
    ask: Callable[[R], Awaitable[Answer]]
    spare: Callable[[set[str]], Awaitable[R | None]]  # a replica not among these peers
    fail: Callable[[R, Exception], None]  # count and ban; raises when failures run out
    report: Callable[[DisagreementReport], None]  # bans the accused, records, notifies
    local: Callable[[], Awaitable[torch.Tensor]] | None = None
    max_escalations: int | None = None  # default: k
    # Next-token logits of an answer (spans ending at the last block): votes compare them.
    logits: Logits | None = None

    @property
    def comparator_kind(self) -> str:
        return "grad" if self.kind == "backward" else "hidden"

    async def _ask_all(self, replicas: list[R]) -> list[tuple[R, Answer | Exception]]:
        results: list[tuple[R, Answer | Exception] | None] = [None] * len(replicas)

        async def one(i: int, replica: R) -> None:
            try:
                results[i] = (replica, await self.ask(replica))
            except Exception as exc:
                results[i] = (replica, exc)

        async with trio.open_nursery() as nursery:
            for i, replica in enumerate(replicas):
                nursery.start_soon(one, i, replica)
        return [r for r in results if r is not None]

    async def run(self, replicas: list[R]) -> Outcome[R]:
        asked = {self.peer_of(r) for r in replicas}
        answered: list[tuple[R, Answer]] = []
        dropped: list[R] = []
        pending = list(replicas)
        escalations, budget = 0, self.k if self.max_escalations is None else self.max_escalations
        decision = Decision([], None)
        while pending:
            for replica, result in await self._ask_all(pending):
                if isinstance(result, Exception):
                    dropped.append(replica)
                    self.fail(replica, result)
                else:
                    answered.append((replica, result))
            pending = []
            missing = self.k - len(answered)
            for _ in range(max(0, missing)):  # replace failed replicas first
                spare = await self.spare(asked)
                if spare is None:
                    break
                asked.add(self.peer_of(spare))
                pending.append(spare)
            if pending:
                continue
            outputs = [a.output for _, a in answered]
            decision = decide(outputs, self.k, self.comparator_kind, self.logits)
            if decision.winner is None and escalations < budget:
                spare = await self.spare(asked)
                if spare is not None:
                    log.warning(
                        "replicas of blocks %d:%d disagree (%s); asking one more server",
                        self.start,
                        self.end,
                        self.why(answered),
                    )
                    escalations += 1
                    asked.add(self.peer_of(spare))
                    pending.append(spare)
        return await self._conclude(answered, dropped, decision, escalations)

    def _logits_pair(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.logits is None or self.comparator_kind != "hidden":
            return None, None
        return self.logits(a), self.logits(b)

    def why(self, answered: Sequence[tuple[R, Answer]]) -> str:
        """Why the first two answers disagree (the comparator's reason), for errors."""
        if len(answered) < 2:
            return "too few answers"
        a, b = answered[0][1].output, answered[1][1].output
        verdict = agreement(a, b, self.comparator_kind, *self._logits_pair(a, b))
        return verdict.reason or "the first two agree; later answers split the vote"

    async def _conclude(
        self,
        answered: list[tuple[R, Answer]],
        dropped: list[R],
        decision: Decision,
        escalations: int,
    ) -> Outcome[R]:
        winner, resolution, output = decision.winner, "majority", None
        if escalations:
            resolution = "escalation"
        if winner is None and self.local is not None and answered:
            reference = await self.local()
            with_reference = [
                n
                for n, (_, a) in zip(decision.clusters, answered, strict=True)
                if agreeing(
                    reference,
                    a.output,
                    self.comparator_kind,
                    *self._logits_pair(reference, a.output),
                )
            ]
            winner = with_reference[0] if with_reference else None
            resolution, output = "local", reference
        if winner is None and output is None:
            resolution = "unresolved"
        several = len(set(decision.clusters)) > 1
        report = None
        if several or resolution in ("unresolved", "local"):
            report = DisagreementReport(
                model_id=self.model_id,
                start=self.start,
                end=self.end,
                kind=self.kind,
                answers=tuple(
                    ReplicaAnswer(a.peer_id, a.evidence, n)
                    for n, (_, a) in zip(decision.clusters, answered, strict=True)
                ),
                # -1: the local recomputation won and no server agreed with it.
                accepted_cluster=winner
                if winner is not None
                else (-1 if output is not None else None),
                resolution=resolution,
                detail=f"redundancy={self.k}, {len(answered)} answers, {escalations} escalations",
            )
            self.report(report)
        if winner is None and output is None:
            raise DisagreementError(
                f"servers disagree on blocks {self.start}:{self.end} ({self.kind}) and no "
                f"value has a majority ({len(answered)} answers): {self.why(answered)}",
                report,
            )
        kept = [r for n, (r, _) in zip(decision.clusters, answered, strict=True) if n == winner]
        lost = [r for n, (r, _) in zip(decision.clusters, answered, strict=True) if n != winner]
        if output is None:
            output = preferred(
                [a for n, (_, a) in zip(decision.clusters, answered, strict=True) if n == winner]
            ).output
        return Outcome(output.float(), kept, dropped + lost, report)
