"""Spot-checks: at random times, ask a server something a client would ask, as a client, and
check it.

Scheduling: checks arrive as a Poisson process (exponential gaps with mean
`check_every` seconds), so a server cannot time its honesty. The server to check is
drawn by picking.py: new identities and servers with little evidence most, a refused
check costing pick weight like an answered one, and servers that keep refusing held to
`max_refusing_share` of the picks and `refusing_concurrent` checks at a time (their own
lane, so stalls never block the other checks). Banned servers are not checked again.

Each check builds a realistic challenge (challenges.py), sends it with the client
library's own code from one of a few long-lived checker clients (checkers.py, probe.py),
recomputes the answer with the reference weights and compares it (judge.py). Only then
is anything recorded: a pass, a failure (an answer that fails the client's checks, or is
wrong within the proof margin), or a proven fraud (a signed wrong answer: the server is
banned and the evidence kept as proof). A server that declines (`busy`), times out or
cannot be reached has refused the check: no evidence about its honesty, but it costs the
server pick weight and the confidence of its score (reputation/refusals.py, score.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from trustswarm.client.swarm import SwarmView
from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.errors import trustswarm_error_in
from trustswarm.protocol.evidence import Evidence
from trustswarm.reputation.refusals import RefusalLedger, with_refusals
from trustswarm.reputation.score import BANNED, REFUSED
from trustswarm.reputation.store import ReputationStore, ServerReputation
from trustswarm.verifier.config import CheckConfig

from .challenges import Challenge, ChallengeFactory
from .checkers import CheckerPool, NoChecker
from .judge import EvidenceRejected, Judge, proof_bytes
from .picking import PickInput, pick_weights, refusing
from .probe import InvalidAnswer, draw_generation, probe

log = logging.getLogger("trustswarm.verifier")
PASS, FAIL, FRAUD, SKIPPED = "pass", "fail", "fraud", "skipped"
__all__ = ["FAIL", "FRAUD", "PASS", "REFUSED", "SKIPPED", "CheckResult", "SpotChecker"]


@dataclass(frozen=True)
class CheckResult:
    peer_id: str
    kind: str  # "forward" | "inference" | "backward"
    start: int
    end: int
    outcome: str  # PASS | FAIL | FRAUD | REFUSED | SKIPPED (the verifier could not check)
    detail: str
    prober: str  # the checker client's peer id the server saw
    seconds: float
    exchanges: int = 0  # signed answers judged (inference: steps)


@dataclass(frozen=True)
class _Plan:
    kind: str
    start: int
    end: int
    decode_steps: int = 0
    max_new_tokens: int = 0


Compute = Callable[..., Awaitable]


class SpotChecker:
    def __init__(
        self,
        view: SwarmView,
        factory: ChallengeFactory,
        judge: Judge,
        store: ReputationStore,
        compute: Compute,
        pool: CheckerPool,
        config: CheckConfig = CheckConfig(),
        rng: random.Random | None = None,
    ) -> None:
        self.view = view
        self.factory = factory
        self.judge = judge
        self.store = store
        self.compute = compute
        self.pool = pool
        self.config = config
        self.rng = rng or random.Random()
        self.model_id = view.model_id
        self.refusals = RefusalLedger(store.engine, store.model)
        self.in_flight: set[str] = set()

    # -- choosing -------------------------------------------------------------------

    def candidates(self) -> list[tuple[Announcement, float]]:
        """Servers we could check now, with their selection weights."""
        return [(ann, weight) for ann, weight, _ in self.weighted()]

    def weighted(self, with_refusing: bool = True) -> list[tuple[Announcement, float, bool]]:
        """Servers we could check now: (announcement, selection weight, keeps refusing)."""
        now = time.time()
        refusals = self.refusals.weights(self.model_id, now)
        anns, items = [], []
        for ann in list(self.view.servers.values()):
            if ann.expired(now) or ann.peer_id in self.in_flight:
                continue
            rep = self.store.get(ann.peer_id, self.model_id, now)
            if rep is not None and rep.state == BANNED:
                continue
            answered = 0 if rep is None else rep.passes + rep.failures
            anns.append(ann)
            items.append(PickInput(answered, refusals.get(ann.peer_id, 0.0)))
        weights = pick_weights(items, self.config.max_refusing_share)
        out = [(a, w, refusing(i)) for a, w, i in zip(anns, weights, items, strict=True)]
        return [c for c in out if with_refusing or not c[2]]

    def pick(self, with_refusing: bool = True) -> tuple[Announcement, bool] | None:
        candidates = self.weighted(with_refusing)
        if not candidates:
            return None
        anns, weights, flags = zip(*candidates, strict=True)
        i = self.rng.choices(range(len(anns)), weights=weights)[0]
        return anns[i], flags[i]

    def standing(self, rep: ServerReputation) -> ServerReputation:
        """What the store says about a server, discounted by the checks it refused."""
        weight = self.refusals.weight(rep.peer_id, rep.model_id)
        return with_refusals(rep, weight, self.store.model)

    def _plan(self, ann: Announcement) -> _Plan:
        cfg = self.config
        start, end = ann.start, ann.end
        draw = self.rng.random()
        if end - start > 1 and self.rng.random() < cfg.sub_span_share:
            start = self.rng.randrange(ann.start, ann.end)
            end = self.rng.randrange(start + 1, ann.end + 1)
        if draw < cfg.inference_share:
            gen = draw_generation(
                self.rng, cfg.min_new_tokens, cfg.max_new_tokens, cfg.early_stop_share
            )
            return _Plan("inference", start, end, gen.decode_steps, gen.max_new_tokens)
        if draw < cfg.inference_share + cfg.backward_share:
            return _Plan("backward", start, end)
        return _Plan("forward", start, end)

    async def _challenge(self, plan: _Plan) -> Challenge:
        if plan.kind == "backward":
            return await self.compute(self.factory.make_backward, plan.start, plan.end)
        return await self.compute(self.factory.make, plan.start, plan.end, plan.decode_steps)

    # -- checking -------------------------------------------------------------------

    async def check(self, ann: Announcement) -> CheckResult:
        plan = self._plan(ann)
        began = time.monotonic()
        peer, prober = ann.peer_id, ""

        def result(outcome: str, detail: str, exchanges: int = 0) -> CheckResult:
            seconds = time.monotonic() - began
            return CheckResult(
                peer, plan.kind, plan.start, plan.end, outcome, detail, prober, seconds, exchanges
            )

        self.in_flight.add(peer)
        try:
            challenge = await self._challenge(plan)  # our errors are not the server's
            max_length = challenge.total_tokens - plan.decode_steps + plan.max_new_tokens
            try:
                async with self.pool.lease() as checker:
                    prober = checker.peer_id
                    evidence = await probe(checker.swarm, ann, challenge, plan.kind, max_length)
            except Exception as group:  # libp2p's nurseries may wrap the error
                exc = trustswarm_error_in(group) or group
                if isinstance(exc, NoChecker):
                    return result(SKIPPED, str(exc))
                if isinstance(exc, InvalidAnswer):
                    start, end, kind = plan.start, plan.end, plan.kind
                    self.store.record_check(peer, self.model_id, start, end, kind, False, str(exc))
                    return result(FAIL, str(exc))
                # Error frames (busy), timeouts, broken streams, unreachable servers.
                detail = f"no answer: {type(exc).__name__}: {exc}"
                self.refusals.record(peer, self.model_id, detail)
                return result(REFUSED, detail)
            outcome, detail = await self._judged(plan, peer, evidence)
            return result(outcome, detail, len(evidence.exchanges))
        finally:
            self.in_flight.discard(peer)

    async def _judged(self, plan: _Plan, peer: str, evidence: Evidence) -> tuple[str, str]:
        kind, start, end = plan.kind, plan.start, plan.end
        try:
            judgement = await self.compute(self.judge.judge, evidence)
        except EvidenceRejected as exc:  # should not happen: the client checked the answer
            log.warning("could not judge a check of %s: %s", peer, exc)
            return SKIPPED, f"unjudgeable: {exc}"
        if judgement.wrong and not judgement.proven:
            # Outside tolerance but within the proof margin: evidence, not proof.
            detail = f"{kind} answer outside tolerance: {judgement.reason}"
            self.store.record_check(peer, self.model_id, start, end, kind, False, detail)
            log.warning("check of %s failed (%s %d:%d): %s", peer, kind, start, end, detail)
            return FAIL, detail
        if judgement.wrong:
            detail = f"signed wrong {kind} answer: {judgement.reason}"
            self.store.record_check(peer, self.model_id, start, end, kind, False, detail)
            proof = proof_bytes(self.model_id, judgement, evidence)
            self.store.ban(peer, self.model_id, detail, proof)
            log.warning("FRAUD by %s (%s %d:%d): %s", peer, kind, start, end, detail)
            return FRAUD, detail
        self.store.record_check(peer, self.model_id, start, end, kind, True)
        return PASS, f"{judgement.steps} answer(s) agree"

    async def run(self, on_result: Callable[[CheckResult], Awaitable[None]]) -> None:
        """Check forever at random times (bounded concurrency); report each result."""
        cfg = self.config
        main = trio.CapacityLimiter(cfg.max_concurrent)
        lane = trio.CapacityLimiter(cfg.refusing_concurrent)  # servers that keep refusing

        async def one(ann: Announcement, limiter: trio.CapacityLimiter) -> None:
            try:
                res = await self.check(ann)
            except Exception:
                log.exception("spot-check of %s failed", ann.peer_id)
                return
            finally:
                limiter.release_on_behalf_of(ann.peer_id)
            log.info(
                "check %s %s %d:%d -> %s (%.2f s, %d answers) %s",
                res.peer_id,
                res.kind,
                res.start,
                res.end,
                res.outcome,
                res.seconds,
                res.exchanges,
                res.detail,
            )
            await on_result(res)

        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(self.rng.expovariate(1.0 / cfg.check_every))
                if main.borrowed_tokens >= main.total_tokens:
                    continue  # checks are slow right now: skip this slot
                picked = self.pick(with_refusing=lane.borrowed_tokens < lane.total_tokens)
                if picked is None:
                    continue
                ann, keeps_refusing = picked
                limiter = lane if keeps_refusing else main
                limiter.acquire_on_behalf_of_nowait(ann.peer_id)
                self.in_flight.add(ann.peer_id)  # not picked again until it is done
                nursery.start_soon(one, ann, limiter)
