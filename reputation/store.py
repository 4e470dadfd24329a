"""A verifier's memory: servers, checks, reports and published records (SQLAlchemy 2.x).

Any SQLAlchemy URL works (SQLite file by default; PostgreSQL with the `postgres` extra,
shared by several verifier processes: see engine.py). Every write commits before
the call returns, so a verifier that is killed and restarted on the same database
keeps its whole history, and `next_sequence` never repeats a number (it also never
falls behind the wall clock in milliseconds, so even a verifier that lost its
database signs records newer than the ones it published before).

Evidence is kept per (server, model) as decayed weights (`pass_weight`,
`fail_weight`, valid at `weights_at`) next to the raw counts, so a score is O(1)
to compute: see score.py for the model.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .engine import (
    create_tables,
    database_url,
    lock_or_create,
    open_engine,
    read_sessions,
    write_sessions,
)
from .records import SignedReputationRecord
from .score import BANNED, ScoreModel
from .tables import Base, CheckRow, CounterRow, PublishedRow, ReportRow, ServerRow

__all__ = [
    "Base",
    "CheckRow",
    "CounterRow",
    "PublishedRow",
    "ReportRow",
    "ReputationStore",
    "ServerReputation",
    "ServerRow",
    "database_url",
]

_TEXT = 512  # longest detail / reason we keep
DEFAULT_MODEL = ScoreModel()


@dataclass(frozen=True)
class ServerReputation:
    peer_id: str
    model_id: str
    state: str  # "ok" | "probation" | "banned"
    score: float  # 0 when banned, else the Beta score in (0, 1)
    passes: int
    failures: int
    last_failure: str | None
    last_checked: float | None
    # Additions to the agreed fields (all defaulted):
    pass_weight: float = 0.0  # decayed evidence at the time of reading
    fail_weight: float = 0.0
    last_failure_at: float | None = None
    ban_reason: str | None = None
    start: int | None = None  # the span last checked
    end: int | None = None
    banned_at: float | None = None
    last_spot_check: float | None = None  # the newest compared spot-check (note_spot_check)
    last_audit: float | None = None  # the newest judged client audit (note_audit)


class ReputationStore:
    """Thread-safe, and safe to share with other processes: every write locks the row it
    changes (engine.py), every method commits before it returns."""

    def __init__(
        self, url: str = "sqlite:///verifier.db", model: ScoreModel = DEFAULT_MODEL
    ) -> None:
        self.url = database_url(url)
        self.model = model
        self.engine = open_engine(self.url)
        try:
            create_tables(self.engine, Base.metadata, f"cannot open reputation database {url!r}")
        except BaseException:
            self.engine.dispose()
            raise
        self._writes = write_sessions(self.engine)
        self._reads = read_sessions(self.engine)
        # SQLite has one writer per file anyway: threads queue here, not on busy_timeout.
        # Database servers lock rows, so threads of one store write concurrently there.
        self._lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if self.engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    # -- evidence -------------------------------------------------------------------

    def record_check(
        self,
        peer_id: str,
        model_id: str,
        start: int,
        end: int,
        kind: str,
        passed: bool,
        detail: str = "",
        at: float | None = None,
    ) -> ServerReputation:
        """Count one compared spot-check. Call only after the comparison is done."""
        at = time.time() if at is None else float(at)
        detail = detail[:_TEXT]
        with self._lock, self._writes.begin() as session:
            row = self._server(session, peer_id, model_id, at)
            pass_weight, fail_weight = self._decayed(row, at)
            age = max(0.0, row.weights_at - at)  # a check older than the weights decays
            fresh = self.model.decay(1.0, age)
            if passed:
                row.passes += 1
                pass_weight += fresh
            else:
                row.failures += 1
                fail_weight += fresh
                if row.last_failure_at is None or at >= row.last_failure_at:
                    row.last_failure = f"{kind} {start}:{end}: {detail}".strip()
                    row.last_failure_at = at
            row.pass_weight, row.fail_weight = pass_weight, fail_weight
            row.weights_at = max(row.weights_at, at)
            row.last_checked = max(row.last_checked or at, at)
            row.start, row.end = start, end
            session.add(
                CheckRow(
                    peer_id=peer_id,
                    model_id=model_id,
                    start=start,
                    end=end,
                    kind=kind[:64],
                    passed=bool(passed),
                    detail=detail,
                    at=at,
                )
            )
            session.flush()
            return self._view(row, at)

    def record_report(
        self,
        reporter: str,
        accused: str,
        model_id: str,
        upheld: bool,
        detail: str,
        at: float | None = None,
    ) -> None:
        """Remember a fraud report (upheld or not). It changes nothing about the accused:
        an upheld report leads the verifier to call `ban` with the proof."""
        at = time.time() if at is None else float(at)
        with self._lock, self._writes.begin() as session:
            session.add(
                ReportRow(
                    reporter=reporter,
                    accused=accused,
                    model_id=model_id,
                    upheld=bool(upheld),
                    detail=detail[:_TEXT],
                    at=at,
                )
            )

    def ban(self, peer_id: str, model_id: str, reason: str, proof: bytes = b"") -> ServerReputation:
        """Proven fraud: ban this identity for good (the first ban's reason and proof stay)."""
        now = time.time()
        with self._lock, self._writes.begin() as session:
            row = self._server(session, peer_id, model_id, now)
            if not row.banned:
                row.banned = True
                row.ban_reason = reason[:_TEXT]
                row.ban_proof = bytes(proof)
                row.banned_at = now
            session.flush()
            return self._view(row, now)

    def note_spot_check(self, peer_id: str, model_id: str, at: float | None = None) -> None:
        """Remember when this verifier last spot-checked the server (its signed records
        carry it); counting the check itself is `record_check`'s."""
        self._note("last_spot_check", peer_id, model_id, at)

    def note_audit(self, peer_id: str, model_id: str, at: float | None = None) -> None:
        """Remember when this verifier last judged a client's audit of the server."""
        self._note("last_audit", peer_id, model_id, at)

    def _note(self, column: str, peer_id: str, model_id: str, at: float | None) -> None:
        at = time.time() if at is None else float(at)
        if not math.isfinite(at):
            raise ValueError(f"{column} must be a finite time, got {at!r}")
        with self._lock, self._writes.begin() as session:
            row = self._server(session, peer_id, model_id, at)
            setattr(row, column, max(getattr(row, column) or at, at))  # never goes back

    # -- reading --------------------------------------------------------------------

    def get(self, peer_id: str, model_id: str, now: float | None = None) -> ServerReputation | None:
        now = time.time() if now is None else now
        with self._lock, self._reads() as session:
            row = session.scalar(
                select(ServerRow).where(
                    ServerRow.peer_id == peer_id, ServerRow.model_id == model_id
                )
            )
            return None if row is None else self._view(row, now)

    def all(self, model_id: str | None = None, now: float | None = None) -> list[ServerReputation]:
        now = time.time() if now is None else now
        query = select(ServerRow).order_by(ServerRow.model_id, ServerRow.peer_id)
        if model_id is not None:
            query = query.where(ServerRow.model_id == model_id)
        with self._lock, self._reads() as session:
            return [self._view(row, now) for row in session.scalars(query)]

    def ban_proof(self, peer_id: str, model_id: str) -> bytes | None:
        with self._lock, self._reads() as session:
            return session.scalar(
                select(ServerRow.ban_proof).where(
                    ServerRow.peer_id == peer_id, ServerRow.model_id == model_id
                )
            )

    def checks(self, peer_id: str | None = None, limit: int = 100) -> list[CheckRow]:
        """Newest checks first."""
        query = select(CheckRow).order_by(CheckRow.at.desc(), CheckRow.id.desc()).limit(limit)
        if peer_id is not None:
            query = query.where(CheckRow.peer_id == peer_id)
        with self._lock, self._reads() as session:
            return list(session.scalars(query))

    def reports_since(self, reporter: str, since: float) -> int:
        """How many reports `reporter` filed at or after `since` (for rate limiting)."""
        with self._lock, self._reads() as session:
            return int(
                session.scalar(
                    select(func.count(ReportRow.id)).where(
                        ReportRow.reporter == reporter, ReportRow.at >= since
                    )
                )
                or 0
            )

    # -- publishing -----------------------------------------------------------------

    def next_sequence(self) -> int:
        """A number larger than every one returned before, also across restarts."""
        now_ms = int(time.time() * 1000)
        with self._lock, self._writes.begin() as session:
            counter = lock_or_create(session, CounterRow, {"name": "sequence"}, {"value": 0})
            counter.value = max(counter.value + 1, now_ms)
            return counter.value

    def save_published(self, record: SignedReputationRecord) -> None:
        """Keep the newest signed record per (verifier, subject, model) for re-publishing."""
        rec = record.record
        with self._lock, self._writes.begin() as session:
            key = {"verifier_id": rec.verifier_id, "subject": rec.subject, "model_id": rec.model_id}
            values = {
                "sequence": rec.sequence,
                "issued_at": rec.issued_at,
                "expires_at": rec.expires_at,
                "data": record.to_bytes(),
            }
            row = lock_or_create(session, PublishedRow, key, values)
            if row.sequence > rec.sequence:
                return  # never replace a newer record with an older one
            for name, value in values.items():
                setattr(row, name, value)

    def published(
        self, model_id: str | None = None, now: float | None = None
    ) -> list[SignedReputationRecord]:
        """The newest unexpired records saved by `save_published`."""
        now = time.time() if now is None else now
        query = select(PublishedRow).where(PublishedRow.expires_at > now)
        if model_id is not None:
            query = query.where(PublishedRow.model_id == model_id)
        out = []
        with self._lock, self._reads() as session:
            for row in session.scalars(query.order_by(PublishedRow.subject)):
                try:
                    out.append(SignedReputationRecord.from_bytes(row.data))
                except Exception:  # noqa: S112 - a damaged row is skipped, not fatal
                    continue
        return out

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ReputationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------

    def _server(self, session: Session, peer_id: str, model_id: str, at: float) -> ServerRow:
        """The server's row, locked until the transaction ends (created if new)."""
        defaults = {
            "first_seen": at,
            "passes": 0,
            "failures": 0,
            "pass_weight": 0.0,
            "fail_weight": 0.0,
            "weights_at": at,
            "banned": False,
        }
        key = {"peer_id": peer_id, "model_id": model_id}
        return lock_or_create(session, ServerRow, key, defaults)

    def _decayed(self, row: ServerRow, now: float) -> tuple[float, float]:
        age = now - row.weights_at
        return self.model.decay(row.pass_weight, age), self.model.decay(row.fail_weight, age)

    def _view(self, row: ServerRow, now: float) -> ServerReputation:
        pass_weight, fail_weight = self._decayed(row, now)
        state = self.model.state(pass_weight, fail_weight, row.banned)
        return ServerReputation(
            peer_id=row.peer_id,
            model_id=row.model_id,
            state=state,
            score=self.model.published_score(pass_weight, fail_weight, state == BANNED),
            passes=row.passes,
            failures=row.failures,
            last_failure=row.last_failure,
            last_checked=row.last_checked,
            pass_weight=pass_weight,
            fail_weight=fail_weight,
            last_failure_at=row.last_failure_at,
            ban_reason=row.ban_reason,
            start=row.start,
            end=row.end,
            banned_at=row.banned_at,
            last_spot_check=row.last_spot_check,
            last_audit=row.last_audit,
        )
