"""Spot-checks: at random times, ask a server something a client would ask, and check it.

Scheduling: checks arrive as a Poisson process (exponential gaps with mean
`check_every` seconds), so a server cannot time its honesty. The server to check is
drawn with weight 1 / (1 + checks so far): new identities and servers with little
evidence are checked most. Banned servers are not checked again.

Each check builds a realistic challenge (challenges.py), sends it from a fresh libp2p
identity (probe.py), recomputes the answer with the reference weights and compares it
(judge.py). Only then is anything recorded: a pass, a failure (an answer that fails
the client's checks), or a proven fraud (a signed wrong answer: the server is banned
and the evidence kept as proof). A server that is down or declines (busy) is not
scored: that is not evidence about its honesty.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID

from trustswarm.client.rpc import SpanCall
from trustswarm.client.swarm import SwarmView
from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.errors import RemoteError, TrustswarmError
from trustswarm.protocol.transport import running_host
from trustswarm.reputation.score import BANNED
from trustswarm.reputation.store import ReputationStore
from trustswarm.verifier.config import CheckConfig

from .challenges import ChallengeFactory
from .judge import EvidenceRejected, Judge, proof_bytes
from .probe import InvalidAnswer, fresh_host, probe

log = logging.getLogger("trustswarm.verifier")
PASS, FAIL, FRAUD, SKIPPED = "pass", "fail", "fraud", "skipped"


@dataclass(frozen=True)
class CheckResult:
    peer_id: str
    kind: str  # "forward" | "inference" | "backward"
    start: int
    end: int
    outcome: str  # PASS | FAIL | FRAUD | SKIPPED
    detail: str
    prober: str  # the fresh peer id the server saw
    seconds: float


Compute = Callable[..., Awaitable]


class SpotChecker:
    def __init__(
        self,
        view: SwarmView,
        factory: ChallengeFactory,
        judge: Judge,
        store: ReputationStore,
        compute: Compute,
        config: CheckConfig = CheckConfig(),
        swarm_key: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.view = view
        self.factory = factory
        self.judge = judge
        self.store = store
        self.compute = compute
        self.config = config
        self.swarm_key = swarm_key
        self.rng = rng or random.Random()
        self.model_id = view.model_id
        self.in_flight: set[str] = set()

    # -- choosing -------------------------------------------------------------------

    def candidates(self) -> list[tuple[Announcement, float]]:
        """Servers we could check now, with their selection weights."""
        now = time.time()
        out = []
        for ann in list(self.view.servers.values()):
            if ann.expired(now) or ann.peer_id in self.in_flight:
                continue
            rep = self.store.get(ann.peer_id, self.model_id)
            if rep is not None and rep.state == BANNED:
                continue
            checks = 0 if rep is None else rep.passes + rep.failures
            out.append((ann, 1.0 / (1.0 + checks)))
        return out

    def pick(self) -> Announcement | None:
        candidates = self.candidates()
        if not candidates:
            return None
        anns, weights = zip(*candidates, strict=True)
        return self.rng.choices(anns, weights=weights)[0]

    def _span(self, ann: Announcement) -> tuple[int, int]:
        start, end = ann.start, ann.end
        if end - start > 1 and self.rng.random() < self.config.sub_span_share:
            a = self.rng.randrange(start, end)
            b = self.rng.randrange(a + 1, end + 1)
            return a, b
        return start, end

    # -- checking -------------------------------------------------------------------

    async def check(self, ann: Announcement) -> CheckResult:
        cfg = self.config
        began = time.monotonic()
        draw = self.rng.random()
        inference = draw < cfg.inference_share
        backward = not inference and draw < cfg.inference_share + cfg.backward_share
        kind = "inference" if inference else "backward" if backward else "forward"
        steps = self.rng.randint(cfg.min_decode_steps, cfg.max_decode_steps) if inference else 0
        start, end = self._span(ann)
        peer = ann.peer_id
        host = fresh_host(self.swarm_key)
        prober = str(host.get_id())

        def result(outcome: str, detail: str) -> CheckResult:
            seconds = time.monotonic() - began
            return CheckResult(peer, kind, start, end, outcome, detail, prober, seconds)

        self.in_flight.add(peer)
        try:
            if backward:
                challenge = await self.compute(self.factory.make_backward, start, end)
            else:
                challenge = await self.compute(self.factory.make, start, end, steps)
            digest = self.view.span_digest(start, end)
            call = SpanCall(ID.from_base58(peer), self.model_id, start, end, digest, ann.dtype)
            try:
                try:
                    async with running_host(host, []):
                        evidence = await probe(
                            host, call, ann.addrs, challenge, inference, cfg.timeout, self.rng
                        )
                except BaseExceptionGroup as group:  # the host's nursery wraps errors
                    raise _single_cause(group) from None
            except InvalidAnswer as exc:
                self.store.record_check(peer, self.model_id, start, end, kind, False, str(exc))
                return result(FAIL, str(exc))
            except (RemoteError, TrustswarmError, trio.TooSlowError, OSError) as exc:
                return result(SKIPPED, f"no answer: {type(exc).__name__}: {exc}")
            except Exception as exc:  # libp2p raises assorted types for dead peers
                return result(SKIPPED, f"no answer: {type(exc).__name__}: {exc}")
            try:
                judgement = await self.compute(self.judge.judge, evidence)
            except EvidenceRejected as exc:  # should not happen: probe checked the answer
                log.warning("could not judge a check of %s: %s", peer, exc)
                return result(SKIPPED, f"unjudgeable: {exc}")
            if judgement.wrong and not judgement.proven:
                # Outside tolerance but within the proof margin: evidence, not proof.
                detail = f"{kind} answer outside tolerance: {judgement.reason}"
                self.store.record_check(peer, self.model_id, start, end, kind, False, detail)
                log.warning("check of %s failed (%s %d:%d): %s", peer, kind, start, end, detail)
                return result(FAIL, detail)
            if judgement.wrong:
                detail = f"signed wrong {kind} answer: {judgement.reason}"
                self.store.record_check(peer, self.model_id, start, end, kind, False, detail)
                proof = proof_bytes(self.model_id, judgement, evidence)
                self.store.ban(peer, self.model_id, detail, proof)
                log.warning("FRAUD by %s (%s %d:%d): %s", peer, kind, start, end, detail)
                return result(FRAUD, detail)
            self.store.record_check(peer, self.model_id, start, end, kind, True)
            return result(PASS, f"{judgement.steps} answer(s) agree")
        finally:
            self.in_flight.discard(peer)

    async def run(self, on_result: Callable[[CheckResult], Awaitable[None]]) -> None:
        """Check forever at random times (bounded concurrency); report each result."""
        limiter = trio.CapacityLimiter(self.config.max_concurrent)

        async def one(ann: Announcement) -> None:
            async with limiter:
                try:
                    res = await self.check(ann)
                except Exception:
                    log.exception("spot-check of %s failed", ann.peer_id)
                    return
            log.info(
                "check %s %s %d:%d -> %s (%.2f s) %s",
                res.peer_id,
                res.kind,
                res.start,
                res.end,
                res.outcome,
                res.seconds,
                res.detail,
            )
            await on_result(res)

        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(self.rng.expovariate(1.0 / self.config.check_every))
                if limiter.borrowed_tokens >= limiter.total_tokens:
                    continue  # checks are slow right now: skip this slot
                ann = self.pick()
                if ann is not None:
                    self.in_flight.add(ann.peer_id)  # not picked again until it is done
                    nursery.start_soon(one, ann)


def _single_cause(exc: BaseException) -> BaseException:
    """A group of one error is that error (nurseries wrap what they raise)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
