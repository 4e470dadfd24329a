"""Fraud reports from clients: `/trustswarm/report/1`.

Wire: the reporter opens a stream and sends ONE length-prefixed frame holding
`DisagreementReport.to_bytes()` (a single piece of evidence travels as a report with
one answer, see `evidence_report`). The verifier answers one Message whose meta holds
`verdict` ("upheld" | "rejected" | "rate_limited"), `detail`, and `banned` (comma-
separated peer ids), or an error frame (bad_request / too_large) for input that is not
a report at all. Nothing a reporter sends stops the handler from serving others.

Review: every answer's evidence is opened (signatures, digests: a forged answer is
rejected) and recomputed with the reference weights; a signer whose signed output the
comparator rejects is banned, with the evidence as proof. The report's own claims
(majority, minority, resolution) are not trusted; only signatures and recomputation
count. A report that does not hold up changes nothing about the accused. Reports are
rate-limited per reporter peer id (Noise-authenticated), counting every attempt in
memory and every reviewed report in the store (so a restart does not reset it).
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
from trustswarm.protocol.errors import (
    BAD_REQUEST,
    INTERNAL,
    TOO_LARGE,
    LimitExceededError,
    ProtocolError,
)
from trustswarm.protocol.evidence import (
    DisagreementReport,
    Evidence,
    EvidenceError,
    ReplicaAnswer,
)
from trustswarm.protocol.framing import StreamClosed, error_message, read_frame, send_message
from trustswarm.protocol.limits import DEFAULT_LIMITS
from trustswarm.reputation.store import ReputationStore
from trustswarm.verifier.config import ReportConfig

from .judge import EvidenceRejected, Judge, proof_bytes

log = logging.getLogger("trustswarm.verifier")
UPHELD, REJECTED, RATE_LIMITED = "upheld", "rejected", "rate_limited"
VERDICTS = (UPHELD, REJECTED, RATE_LIMITED)


@dataclass(frozen=True)
class ReportVerdict:
    verdict: str
    detail: str
    banned: tuple[str, ...] = ()

    def to_message(self) -> Message:
        return Message(
            meta={
                "verdict": self.verdict,
                "detail": self.detail[:4000],
                "banned": ",".join(self.banned),
            }
        )


class BadReport(ProtocolError):
    """Input that is not a usable report (answered with an error frame)."""


def evidence_report(
    model_id: str, start: int, end: int, kind: str, evidence: Evidence, detail: str = ""
) -> DisagreementReport:
    """One signed answer (or one session's steps) as a report with a single answer."""
    signer = evidence.signer
    return DisagreementReport(
        model_id=model_id,
        start=start,
        end=end,
        kind=kind,
        answers=(ReplicaAnswer(signer, evidence, 0),),
        accepted_cluster=None,
        resolution="unresolved",
        detail=detail,
    )


def parse_report(data: bytes, config: ReportConfig = ReportConfig()) -> DisagreementReport:
    """Decode a report frame within the desk's limits. Raises BadReport, nothing else."""
    try:
        report = DisagreementReport.from_bytes(data, config.max_bytes)
    except EvidenceError as exc:
        raise BadReport(f"not a disagreement report: {exc}") from None
    if not 1 <= len(report.answers) <= config.max_answers:
        raise BadReport(f"a report must hold 1..{config.max_answers} answers")
    exchanges = sum(len(a.evidence.exchanges) for a in report.answers)
    if exchanges > config.max_exchanges:
        raise BadReport(f"{exchanges} exchanges exceed the limit {config.max_exchanges}")
    return report


class ReportDesk:
    def __init__(
        self,
        judge: Judge,
        store: ReputationStore,
        compute: Callable[..., Awaitable],
        config: ReportConfig = ReportConfig(),
        on_ban: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.judge = judge
        self.store = store
        self.model_id = judge.model_id
        self.compute = compute
        self.config = config
        self.on_ban = on_ban
        self._attempts: dict[str, deque[float]] = {}
        self.limits = replace(DEFAULT_LIMITS, max_frame_bytes=config.max_bytes)

    # -- rate limiting ----------------------------------------------------------------

    def rate_limited(self, reporter: str, now: float | None = None) -> bool:
        """Count this attempt; True if the reporter is over its allowance."""
        now = time.time() if now is None else now
        since = now - self.config.window
        if len(self._attempts) > 10_000:  # forget idle reporters
            for peer in [p for p, q in self._attempts.items() if not q or q[-1] < since]:
                del self._attempts[peer]
        attempts = self._attempts.setdefault(reporter, deque())
        while attempts and attempts[0] < since:
            attempts.popleft()
        stored = self.store.reports_since(reporter, since)
        limited = max(len(attempts), stored) >= self.config.max_reports
        attempts.append(now)
        return limited

    # -- review -----------------------------------------------------------------------

    def parse(self, data: bytes) -> DisagreementReport:
        return parse_report(data, self.config)

    async def review(self, reporter: str, report: DisagreementReport) -> ReportVerdict:
        if report.model_id != self.model_id:
            verdict = ReportVerdict(REJECTED, f"this verifier checks {self.model_id!r} only")
            self._remember(reporter, report, verdict)
            return verdict
        banned: list[str] = []
        notes: list[str] = []
        for i, answer in enumerate(report.answers):
            try:
                judgement = await self.compute(self.judge.judge, answer.evidence)
            except EvidenceRejected as exc:
                notes.append(f"answer {i}: rejected evidence: {exc}")
                continue
            if not judgement.wrong:
                notes.append(f"answer {i} by {judgement.signer}: agrees with the reference")
                continue
            if not judgement.proven:
                # Within the proof margin: a report is not a check, so it changes nothing.
                notes.append(
                    f"answer {i} by {judgement.signer}: outside tolerance but not beyond the "
                    f"proof margin ({judgement.reason})"
                )
                continue
            detail = f"signed wrong {judgement.kind} answer (report): {judgement.reason}"
            proof = proof_bytes(self.model_id, judgement, answer.evidence)
            self.store.record_check(
                judgement.signer,
                self.model_id,
                judgement.start,
                judgement.end,
                judgement.kind,
                False,
                detail,
            )
            self.store.ban(judgement.signer, self.model_id, detail, proof)
            log.warning("report from %s upheld: banned %s: %s", reporter, judgement.signer, detail)
            if judgement.signer not in banned:
                banned.append(judgement.signer)
            notes.append(f"answer {i} by {judgement.signer}: WRONG: {judgement.reason}")
        verdict = ReportVerdict(UPHELD if banned else REJECTED, "; ".join(notes), tuple(banned))
        self._remember(reporter, report, verdict)
        if self.on_ban is not None:
            for peer in banned:
                await self.on_ban(peer)
        return verdict

    def _remember(self, reporter: str, report: DisagreementReport, verdict: ReportVerdict) -> None:
        accused = (
            verdict.banned[0]
            if verdict.banned
            else (report.minority or tuple(a.peer_id for a in report.answers) or ("",))[0]
        )
        self.store.record_report(
            reporter, accused[:128], self.model_id, verdict.verdict == UPHELD, verdict.detail
        )

    # -- the stream handler -----------------------------------------------------------

    async def handle(self, stream: INetStream) -> None:
        reporter = str(stream.muxed_conn.peer_id)
        try:
            if self.rate_limited(reporter):
                log.info("report from %s: rate limited", reporter)
                answer = ReportVerdict(RATE_LIMITED, "too many reports; try later").to_message()
            else:
                with trio.fail_after(self.config.timeout):
                    data = await read_frame(stream, self.limits)
                answer = (await self.review(reporter, self.parse(data))).to_message()
            await send_message(stream, answer)
        except StreamClosed:
            pass
        except Exception as exc:
            await refuse(stream, exc, "report", reporter)
        finally:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:  # noqa: S110
                    pass


async def refuse(stream: INetStream, exc: Exception, what: str, sender: str) -> None:
    """Answer input we cannot take with an error frame: too_large, bad_request (also for
    input not received in time) or internal. Best effort: the sender may be gone."""
    if isinstance(exc, LimitExceededError):
        code, text = TOO_LARGE, str(exc)
    elif isinstance(exc, ProtocolError | trio.TooSlowError):
        code, text = BAD_REQUEST, str(exc) or f"{what} not received in time"
    else:
        log.error("%s from %s failed", what, sender, exc_info=exc)
        code, text = INTERNAL, f"internal error ({type(exc).__name__})"
    log.info("%s from %s refused: %s", what, sender, text)
    with trio.move_on_after(2):
        try:
            await send_message(stream, error_message(code, text))
        except Exception:  # noqa: S110 - the sender may be gone
            pass
