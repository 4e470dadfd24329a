"""Client audits: a random sample of the client's own exchanges, judged by its verifiers.

Every piece of evidence the client ends up holding about one server (one forward or
backward answer, or one hop's inference transcript once its session has ended: closed by
the user, failed over, or outvoted) is offered here. `Auditor.offer` draws, after the
answer is in, whether to audit it (probability `audit_rate`); the server cannot know
which exchanges will be audited, so it cannot be honest on exactly those. A chosen audit
goes into a small per-verifier outbox and is sent in the background on
`/trustswarm/audit/1` (one frame: the evidence in the report codec with a single answer;
one short acknowledgement back, never the verdict). Nothing here ever waits inside a
user's call: `offer` only draws and appends; a slow or unreachable verifier makes the
outbox drop its oldest audit (with a log line), never the caller wait.

Audits go to the trusted verifiers named by a full multiaddr (a verifier the client can
dial). An audit shows that verifier the audited hidden states, i.e. (largely) the
client's prompt and output for that exchange: see README.md, "Audits".
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost

from trustswarm.protocol import protocols
from trustswarm.protocol.codec import decode_message
from trustswarm.protocol.errors import ProtocolError, TrustswarmError
from trustswarm.protocol.evidence import DisagreementReport, Evidence, ReplicaAnswer
from trustswarm.protocol.statement import SignedStatement

from .reports import send_frame

log = logging.getLogger("trustswarm.client")

# 3 %: a cheater is banned after about 1/0.03 = 33 cheated exchanges with auditing
# clients whatever fraction of answers it cheats on (SECURITY.md, "Audits"), while a
# verifier spends ~3 % of the auditing clients' server compute and sees 3 % of their
# exchanges. README.md, "Audits", gives the reasoning.
DEFAULT_AUDIT_RATE = 0.03
ACCEPTED, RATE_LIMITED = "accepted", "rate_limited"
AUDIT_VERDICTS = (ACCEPTED, RATE_LIMITED)


class AuditOptionError(TrustswarmError, ValueError):
    """An audit option out of range (a ValueError like the client's other options)."""


def check_audit_rate(rate: object) -> float:
    """The share of exchanges to audit: a number in [0, 1] (0 turns audits off)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise AuditOptionError(f"audit_rate must be a number in [0, 1], got {rate!r}")
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise AuditOptionError(f"audit_rate must lie in [0, 1], got {rate!r}")
    return float(rate)


@dataclass(frozen=True)
class AuditAck:
    verdict: str  # ACCEPTED | RATE_LIMITED
    detail: str


def audit_payload(evidence: Evidence) -> bytes:
    """The evidence as `/trustswarm/audit/1` carries it: a report with one answer.
    Kind, span and signer come from the (client-checked) statement of its last answer."""
    answer = decode_message(evidence.exchanges[-1].answer)
    statement = SignedStatement.from_meta(answer.meta).statement
    return DisagreementReport(
        model_id=statement.model_id,
        start=statement.start,
        end=statement.end,
        kind=statement.kind,
        answers=(ReplicaAnswer(statement.server_peer_id, evidence, 0),),
        accepted_cluster=None,
        resolution="unresolved",
        detail="audit",
    ).to_bytes()


async def send_audit(host: IHost, verifier: str, payload: bytes, timeout: float = 30.0) -> AuditAck:
    """Hand one audit to a verifier (a multiaddr or a reachable peer id); returns its
    acknowledgement. Raises RemoteError for an error frame, ProtocolError for an answer
    that is not an acknowledgement."""
    answer = await send_frame(host, verifier, protocols.AUDIT, payload, timeout)
    verdict = answer.meta.get("verdict", "")
    if verdict not in AUDIT_VERDICTS:
        raise ProtocolError(f"verifier answered an unknown audit verdict {verdict[:40]!r}")
    return AuditAck(verdict, answer.meta.get("detail", "")[:2000])


@dataclass
class AuditStats:
    offered: int = 0  # pieces of evidence seen
    chosen: int = 0  # drawn for an audit
    sent: int = 0  # handed to a verifier (per verifier)
    accepted: int = 0
    refused: int = 0  # rate_limited by the verifier
    dropped: int = 0  # pushed out of a full outbox
    failed: int = 0  # the verifier could not be reached or answered an error


@dataclass
class _Outbox:
    verifier: str
    max_pending: int
    pending: deque[Evidence] = field(default_factory=deque)
    wake: trio.Event = field(default_factory=trio.Event)
    sending: int = 0  # taken from `pending`, not yet answered

    def put(self, evidence: Evidence) -> bool:
        """Append; returns False when the oldest pending audit had to go."""
        self.pending.append(evidence)
        self.wake.set()
        if len(self.pending) <= self.max_pending:
            return True
        self.pending.popleft()
        return False


class Auditor:
    """Draws which exchanges to audit and sends them to `verifiers` in the background."""

    def __init__(
        self,
        verifiers: Sequence[str],
        rate: float,
        *,
        max_pending: int = 32,
        max_sending: int = 4,
        timeout: float = 30.0,
        retry_after: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if max_pending < 1 or max_sending < 1:
            raise AuditOptionError("max_pending and max_sending must be at least 1")
        self.max_sending = max_sending  # audits on the way to one verifier at a time
        self.rate = check_audit_rate(rate)
        self.timeout = timeout
        self.retry_after = retry_after
        # The draw must be unpredictable to servers; nothing about it goes on the wire.
        self.rng = rng or random.SystemRandom()
        self.outboxes = [_Outbox(v, max_pending) for v in verifiers]
        self.stats = AuditStats()

    @property
    def pending(self) -> int:
        """Audits not yet answered by their verifier (queued or being sent)."""
        return sum(len(box.pending) + box.sending for box in self.outboxes)

    def offer(self, evidence: Evidence) -> bool:
        """Called when an exchange has ended; draws whether to audit it. Never blocks."""
        self.stats.offered += 1
        if self.rng.random() >= self.rate:
            return False
        self.stats.chosen += 1
        for box in self.outboxes:
            if not box.put(evidence):
                self.stats.dropped += 1
                log.warning(
                    "audits to verifier %s are not getting through: dropped the oldest of %d",
                    box.verifier[-12:],
                    box.max_pending + 1,
                )
        return True

    async def run(self, host: IHost) -> None:
        """Send audits until cancelled (started in the client's background nursery)."""
        async with trio.open_nursery() as nursery:
            for box in self.outboxes:
                nursery.start_soon(self._drain, host, box)

    async def _drain(self, host: IHost, box: _Outbox) -> None:
        slots = trio.Semaphore(self.max_sending)
        async with trio.open_nursery() as nursery:
            while True:
                if not box.pending:
                    box.wake = trio.Event()
                    await box.wake.wait()
                    continue
                await slots.acquire()  # released by _send once the verifier answered
                evidence = box.pending.popleft()  # never empty: only offer() drops, oldest
                box.sending += 1
                nursery.start_soon(self._send, host, box, evidence, slots)

    async def _send(
        self, host: IHost, box: _Outbox, evidence: Evidence, slots: trio.Semaphore
    ) -> None:
        try:
            payload = await trio.to_thread.run_sync(audit_payload, evidence)
            ack = await send_audit(host, box.verifier, payload, self.timeout)
        except Exception as exc:  # best effort: the user's calls never see this
            self.stats.failed += 1
            log.warning("could not send an audit to %s: %s", box.verifier[-12:], exc)
            box.sending -= 1
            await trio.sleep(self.retry_after)  # do not hammer a verifier that is down
            slots.release()
            return
        box.sending -= 1
        slots.release()
        self.stats.sent += 1
        if ack.verdict == ACCEPTED:
            self.stats.accepted += 1
        else:
            self.stats.refused += 1
            log.info("verifier %s refused an audit: %s", box.verifier[-12:], ack.detail)


def audit_targets(trusted_verifiers: Iterable[str]) -> list[str]:
    """The trusted verifiers audits go to: those named by a full multiaddr."""
    return [str(v) for v in trusted_verifiers if "/p2p/" in str(v)]


def make_auditor(trusted_verifiers: Iterable[str], audit_rate: float) -> Auditor | None:
    """An Auditor for the client's options, or None (audit_rate 0, or no verifier the
    client can dial)."""
    rate = check_audit_rate(audit_rate)
    targets = audit_targets(trusted_verifiers)
    if rate == 0.0 or not targets:
        return None
    return Auditor(targets, rate)
