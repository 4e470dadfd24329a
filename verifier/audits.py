"""Client audits: `/trustswarm/audit/1`.

Wire: the client opens a stream and sends ONE length-prefixed frame holding one piece of
evidence about one server in the report codec (`DisagreementReport.to_bytes()` with a
single answer: one forward or backward exchange, or steps 0..n of one hop's inference
session). The verifier answers at once with a Message whose meta holds `verdict`
("accepted" | "rate_limited") and `detail`, or an error frame (bad_request / too_large).
The verdict itself is never sent: the client does not wait for judging.

Judging: accepted audits wait in a fair queue (audit_queue.py: one FIFO per client,
round robin, bounded) and are judged one at a time by the same `Judge` as spot-checks
and reports, after every report waiting for compute (reports first), with at most
`compute_share` of the time. The verdict counts in the score like a spot-check:

* every answer agrees with the reference: a pass;
* an answer outside tolerance but within the proof margin: a failed check;
* an answer wrong beyond the proof margin: a ban, the evidence kept as proof;
* inconclusive (differs only on inputs no natural prompt produces), or evidence that
  does not open (forged, other weights, invalid request): nothing.

Audits of servers already banned are not judged. Quotas count accepted audits per client
peer id (Noise-authenticated) in memory; a restart resets them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import trio
from libp2p.abc import INetStream

from trustswarm.protocol.codec import Message
from trustswarm.protocol.errors import ProtocolError
from trustswarm.protocol.evidence import DisagreementReport, Evidence, EvidenceError
from trustswarm.protocol.framing import StreamClosed, read_frame, send_message
from trustswarm.protocol.limits import DEFAULT_LIMITS
from trustswarm.reputation.score import BANNED
from trustswarm.reputation.store import ReputationStore

from .audit_queue import Compute, FairQueue, Priority, Quota, budget_pause
from .config import AuditConfig
from .judge import EvidenceRejected, Judge, Judgement, proof_bytes
from .reports import refuse

log = logging.getLogger("trustswarm.verifier")
ACCEPTED, RATE_LIMITED = "accepted", "rate_limited"
PASS, FAIL, FRAUD, INCONCLUSIVE, UNJUDGED = "pass", "fail", "fraud", "inconclusive", "unjudged"
DEFAULT_AUDITS = AuditConfig()


class BadAudit(ProtocolError):
    """Input that is not a usable audit (answered with an error frame)."""


def parse_audit(data: bytes, config: AuditConfig = DEFAULT_AUDITS) -> Evidence:
    """Decode an audit frame within the desk's limits. Raises BadAudit, nothing else.
    Only the evidence counts; the header's claims (kind, span, signer) are not trusted."""
    try:
        report = DisagreementReport.from_bytes(data, config.max_bytes)
    except EvidenceError as exc:
        raise BadAudit(f"not an audit: {exc}") from None
    if len(report.answers) != 1:
        raise BadAudit("an audit holds exactly one answer")
    evidence = report.answers[0].evidence
    if len(evidence.exchanges) > config.max_exchanges:
        raise BadAudit(f"{len(evidence.exchanges)} exchanges exceed {config.max_exchanges}")
    return evidence


@dataclass(frozen=True)
class Audit:
    client: str  # the peer id that sent it
    evidence: Evidence
    size: int  # bytes on the wire
    received: float  # time.monotonic()


@dataclass(frozen=True)
class AuditResult:
    client: str
    peer_id: str  # the server audited ("" when the evidence did not open)
    kind: str
    start: int
    end: int
    outcome: str  # PASS | FAIL | FRAUD | INCONCLUSIVE | UNJUDGED
    detail: str
    steps: int  # exchanges recomputed
    seconds: float  # compute wall time
    cpu_seconds: float  # CPU time of the judging thread
    waited: float  # seconds in the queue


@dataclass
class AuditStats:
    received: int = 0
    refused: int = 0  # over quota
    evicted: int = 0  # pushed out of a full queue
    judged: int = 0
    cpu_seconds: float = 0.0


@dataclass(frozen=True)
class _Timed:
    judgement: Judgement | None
    error: str
    seconds: float
    cpu_seconds: float


class AuditDesk:
    def __init__(
        self,
        judge: Judge,
        store: ReputationStore,
        compute: Compute,
        config: AuditConfig = DEFAULT_AUDITS,
        on_change: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.judge = judge
        self.store = store
        self.model_id = judge.model_id
        self.compute = compute
        self.config = config
        self.on_change = on_change
        self.priority = Priority()  # report reviews wrap their compute with it
        self.quota = Quota(config.max_per_window, config.window)
        self.queue: FairQueue[Audit] = FairQueue(config.queue_items, config.queue_bytes)
        self.results: deque[AuditResult] = deque(maxlen=10_000)
        self.stats = AuditStats()
        self.limits = replace(DEFAULT_LIMITS, max_frame_bytes=config.max_bytes)
        self._wake = trio.Event()

    # -- receiving --------------------------------------------------------------------

    def submit(self, client: str, evidence: Evidence, size: int) -> None:
        """Queue an accepted audit (the quota was checked by the caller)."""
        self.stats.received += 1
        audit = Audit(client, evidence, size, time.monotonic())
        for owner, _ in self.queue.put(client, audit, size):
            self.stats.evicted += 1
            log.info("audit queue full: dropped the oldest audit of client %s", owner)
        self._wake.set()

    async def handle(self, stream: INetStream) -> None:
        client = str(stream.muxed_conn.peer_id)
        try:
            if not self.quota.admit(client, time.monotonic()):
                self.stats.refused += 1
                log.info("audit from %s: over its quota", client)
                answer = _ack(RATE_LIMITED, "too many audits; try later")
            else:
                with trio.fail_after(self.config.timeout):
                    data = await read_frame(stream, self.limits)
                self.submit(client, parse_audit(data, self.config), len(data))
                answer = _ack(ACCEPTED, "queued")
            await send_message(stream, answer)
        except StreamClosed:
            pass
        except Exception as exc:
            await refuse(stream, exc, "audit", client)
        finally:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:  # noqa: S110 - the client may be gone
                    pass

    # -- judging ----------------------------------------------------------------------

    async def run(self) -> None:
        """Judge queued audits forever: reports first, at most compute_share of the time."""
        while True:
            entry = self.queue.get()
            if entry is None:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            await self.priority.wait_idle()
            try:
                result = await self.judge_audit(entry[1])
            except Exception:
                log.exception("judging an audit from %s failed", entry[0])
                continue
            await trio.sleep(budget_pause(result.seconds, self.config.compute_share))

    async def judge_audit(self, audit: Audit) -> AuditResult:
        waited = time.monotonic() - audit.received
        signer = _signer(audit.evidence)
        rep = self.store.get(signer, self.model_id) if signer else None
        if rep is not None and rep.state == BANNED:
            timed = _Timed(None, "the server is already banned", 0.0, 0.0)
        else:
            timed = await self.compute(self._timed_judge, audit.evidence)
        self.stats.judged += 1
        self.stats.cpu_seconds += timed.cpu_seconds
        result = await self._conclude(audit, signer, timed, waited)
        self.results.append(result)
        log.info(
            "audit from %s of %s %s %d:%d -> %s (%d steps, %.3f s, cpu %.3f s, waited %.1f s) %s",
            result.client,
            result.peer_id or "?",
            result.kind,
            result.start,
            result.end,
            result.outcome,
            result.steps,
            result.seconds,
            result.cpu_seconds,
            result.waited,
            result.detail[:300],
        )
        return result

    def _timed_judge(self, evidence: Evidence) -> _Timed:
        """In the compute thread: the judgement with its wall and CPU time."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            judgement, error = self.judge.judge(evidence), ""
        except EvidenceRejected as exc:
            judgement, error = None, f"rejected evidence: {exc}"
        return _Timed(judgement, error, time.perf_counter() - wall, time.thread_time() - cpu)

    async def _conclude(
        self, audit: Audit, signer: str, timed: _Timed, waited: float
    ) -> AuditResult:
        j = timed.judgement

        def result(outcome: str, detail: str) -> AuditResult:
            kind, start, end, steps = (j.kind, j.start, j.end, j.steps) if j else ("", 0, 0, 0)
            return AuditResult(
                audit.client,
                j.signer if j else signer,
                kind,
                start,
                end,
                outcome,
                detail,
                steps,
                timed.seconds,
                timed.cpu_seconds,
                waited,
            )

        if j is None:
            return result(UNJUDGED, timed.error)
        if not j.wrong:
            if j.inconclusive:  # no verdict either way: never counts against a server
                return result(INCONCLUSIVE, j.reason)
            self._record(j, True, f"audit from {audit.client}")
            outcome = result(PASS, f"{j.steps} answer(s) agree")
        elif not j.proven:
            detail = f"audited {j.kind} answer outside tolerance: {j.reason}"
            self._record(j, False, detail)
            log.warning(
                "audit of %s failed (%s %d:%d): %s", j.signer, j.kind, j.start, j.end, detail
            )
            outcome = result(FAIL, detail)
        else:
            detail = f"signed wrong {j.kind} answer (audit from {audit.client}): {j.reason}"
            self._record(j, False, detail)
            self.store.ban(
                j.signer, self.model_id, detail, proof_bytes(self.model_id, j, audit.evidence)
            )
            log.warning(
                "FRAUD by %s (%s %d:%d), banned: %s", j.signer, j.kind, j.start, j.end, detail
            )
            outcome = result(FRAUD, detail)
        if self.on_change is not None:
            await self.on_change(j.signer)
        return outcome

    def _record(self, j: Judgement, passed: bool, detail: str) -> None:
        self.store.record_check(j.signer, self.model_id, j.start, j.end, j.kind, passed, detail)


def _ack(verdict: str, detail: str) -> Message:
    return Message(meta={"verdict": verdict, "detail": detail})


def _signer(evidence: Evidence) -> str:
    """The peer id the evidence names (unchecked: only to skip banned servers)."""
    try:
        return evidence.signer[:128]
    except Exception:  # undecodable: the judge will reject it
        return ""
