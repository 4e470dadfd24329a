"""What the health page shows: a snapshot of the swarm, built from the client's own view.

`snapshot_model` reads a `SwarmView` (announcements the client accepted, RTTs it
measured, its own bans, the reputation records of the verifiers it trusts) and turns
it into plain dataclasses the renderers (HTML, JSON, Prometheus) share. Pure: no
networking, no clock of its own (`now` is passed in), safe to property-test.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from trustswarm.client.swarm import SwarmView
from trustswarm.protocol.announcement import Announcement
from trustswarm.reputation.score import BANNED, OK

from .measure import Measurement, boasting

HEALTHY = "healthy"
BROKEN = "broken"
UNVERIFIED = "unverified"  # no trusted verifier configured


@dataclass(frozen=True)
class VerifierRecord:
    """One trusted verifier's newest unexpired record about one server."""

    verifier_id: str
    state: str
    score: float
    passes: int
    failures: int
    issued_at: float  # when the verifier signed it (it re-signs after each check round)
    expires_at: float
    last_check_at: float | None = None  # its last spot-check of the server (signed)
    last_audit_at: float | None = None  # the last client audit of the server it judged
    ban_reason: str | None = None  # banned records: the verifier's short reason (signed)


@dataclass(frozen=True)
class ServerRow:
    peer_id: str
    start: int
    end: int
    dtype: str
    weights_digest: str
    throughput: float  # announced, tokens/s
    rtt: float | None  # measured by our info requests (seconds), None before the first
    active_sessions: int | None
    addrs: tuple[str, ...]
    observed_ip: str | None
    state: str  # ok | probation | banned (trusted verifiers), unverified, or our own ban
    score: float | None  # median over trusted verifiers
    banned: bool
    ban_reason: str | None
    records: tuple[VerifierRecord, ...] = ()
    expires_at: float = 0.0
    # Our own timed forward request (health/measure.py); None before the first / if off.
    measured_throughput: float | None = None  # tokens/s, net of the RTT
    measured_at: float | None = None  # wall time of the last measurement
    measure_error: str | None = None  # why the last measurement failed
    boasting: bool = False  # announces more than boast_factor x what we measured


@dataclass(frozen=True)
class ModelHealth:
    model_id: str
    num_blocks: int  # from the manifest, else the highest block any server announces
    status: str  # healthy | broken
    coverage: tuple[int, ...]  # per block: usable servers covering it
    established: tuple[int, ...]  # per block: usable servers trusted verifiers call ok
    servers: tuple[ServerRow, ...]
    digest_conflicts: tuple[str, ...] = ()  # spans announced with different weights
    error: str | None = None  # the last discovery error, if any

    @property
    def uncovered(self) -> list[int]:
        return [block for block, n in enumerate(self.coverage) if n == 0]


@dataclass(frozen=True)
class SwarmSnapshot:
    taken_at: float
    refresh_seconds: float
    trusted_verifiers: tuple[str, ...]
    models: tuple[ModelHealth, ...] = field(default_factory=tuple)
    error: str | None = None  # why no model is shown (discovery failed)

    def to_json(self) -> dict:
        """A JSON-safe dict (NaN and infinities become null)."""
        return _finite(asdict(self))


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _records(view: SwarmView, peer_id: str, now: float) -> tuple[VerifierRecord, ...]:
    if view.trust is None:
        return ()
    return tuple(
        VerifierRecord(
            verifier_id=r.verifier_id,
            state=r.state,
            score=r.score,
            passes=r.passes,
            failures=r.failures,
            issued_at=r.issued_at,
            expires_at=r.expires_at,
            last_check_at=r.last_check_at,
            last_audit_at=r.last_audit_at,
            ban_reason=r.ban_reason,
        )
        for r in (signed.record for signed in view.trust.current(peer_id, now))
    )


def ban_reason(view: SwarmView, peer_id: str, now: float, monotonic: float) -> str | None:
    """Why this client does not use the server: a trusted verifier's ban (records carry
    the evidence counts, not the verifier's text), a lost vote, or our own backoff."""
    reasons = []
    for record in _records(view, peer_id, now):
        if record.state == BANNED:
            why = f": {record.ban_reason}" if record.ban_reason else ""
            reasons.append(
                f"banned by verifier {record.verifier_id}{why} "
                f"({record.failures} failed, {record.passes} passed checks)"
            )
    if peer_id in view.banned_for_session:
        reasons.append("outvoted by other servers' answers")
    ban = view.bans.get(peer_id)
    if ban is not None and ban.until > monotonic:
        reasons.append(ban.reason)
    return "; ".join(reasons) if reasons else None


def server_row(
    view: SwarmView,
    ann: Announcement,
    now: float,
    monotonic: float,
    measured: Measurement | None = None,
    boast_factor: float = math.inf,
) -> ServerRow:
    peer = ann.peer_id
    reason = ban_reason(view, peer, now, monotonic)
    if view.trust is None:
        state = UNVERIFIED
        score = None
    else:
        state = view.trust.state(peer, now)
        score = view.trust.score(peer, now)
    if reason is not None:
        state = BANNED
    return ServerRow(
        peer_id=peer,
        start=ann.start,
        end=ann.end,
        dtype=ann.dtype,
        weights_digest=ann.weights_digest,
        throughput=ann.throughput,
        rtt=view.rtts.get(peer),
        active_sessions=view.sessions.get(peer),
        addrs=tuple(ann.addrs),
        observed_ip=view.observed.get(peer),
        state=state,
        score=score,
        banned=reason is not None,
        ban_reason=reason,
        records=_records(view, peer, now),
        expires_at=ann.expires_at,
        measured_throughput=None if measured is None else measured.tokens_per_second,
        measured_at=None if measured is None else measured.at,
        measure_error=None if measured is None else measured.error,
        boasting=measured is not None
        and boasting(ann.throughput, measured.tokens_per_second, boast_factor),
    )


def coverage(rows: Iterable[ServerRow], num_blocks: int, only_ok: bool) -> tuple[int, ...]:
    counts = [0] * num_blocks
    for row in rows:
        if row.banned or (only_ok and row.state != OK):
            continue
        for block in range(max(0, row.start), min(row.end, num_blocks)):
            counts[block] += 1
    return tuple(counts)


def digest_conflicts(rows: Iterable[ServerRow]) -> tuple[str, ...]:
    """Spans that servers announce with different weights digests (some serve other
    weights under this model's name; without a manifest we cannot tell which)."""
    seen: dict[tuple[int, int], set[str]] = {}
    for row in rows:
        seen.setdefault((row.start, row.end), set()).add(row.weights_digest)
    return tuple(f"{a}:{b}" for (a, b), digests in sorted(seen.items()) if len(digests) > 1)


def snapshot_model(
    view: SwarmView,
    num_blocks: int | None = None,
    now: float | None = None,
    error: str | None = None,
    measurements: Mapping[str, Measurement] | None = None,
    boast_factor: float = math.inf,
) -> ModelHealth:
    """The health of one model as `view` sees it. `num_blocks`: from the manifest when
    known; otherwise the highest block end any server announces. `measurements`: our
    own throughput measurements by peer id (health/measure.py)."""
    measurements = measurements or {}
    now = time.time() if now is None else now
    monotonic = time.monotonic()
    announcements = [a for a in view.servers.values() if not a.expired(now)]
    rows = sorted(
        (
            server_row(view, ann, now, monotonic, measurements.get(ann.peer_id), boast_factor)
            for ann in announcements
        ),
        key=lambda r: (r.start, r.end, r.peer_id),
    )
    blocks = num_blocks if num_blocks is not None else max((r.end for r in rows), default=0)
    usable = coverage(rows, blocks, only_ok=False)
    healthy = blocks > 0 and all(usable)
    return ModelHealth(
        model_id=view.model_id,
        num_blocks=blocks,
        status=HEALTHY if healthy else BROKEN,
        coverage=usable,
        established=coverage(rows, blocks, only_ok=view.trust is not None),
        servers=tuple(rows),
        digest_conflicts=digest_conflicts(rows),
        error=error,
    )
