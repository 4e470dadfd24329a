"""Checks a server refused: declined (`busy` or another error frame), let time out, or
did not take at all. Kept next to the reputation store (same database, own table), as a
decayed weight per (server, model); see score.py for what refusals do to a score.

A refusal is neither a pass nor a failure, so it never goes through
`ReputationStore.record_check`; `with_refusals` applies the ledger to what the store
says about a server when a record is signed, and the verifier's check picking reads the
weights (verifier/picking.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

from sqlalchemy import Engine, Float, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .engine import create_tables, lock_or_create, read_sessions, write_sessions
from .score import BANNED, ScoreModel
from .store import ServerReputation

_TEXT = 512


class _Base(DeclarativeBase):
    pass


class RefusalRow(_Base):
    __tablename__ = "refusals"
    __table_args__ = (UniqueConstraint("peer_id", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[str] = mapped_column(String(128), index=True)
    model_id: Mapped[str] = mapped_column(String(256))
    count: Mapped[int] = mapped_column(Integer, default=0)
    weight: Mapped[float] = mapped_column(Float, default=0.0)  # decayed, valid at weight_at
    weight_at: Mapped[float] = mapped_column(Float)
    last_detail: Mapped[str] = mapped_column(Text, default="")


class RefusalLedger:
    """Decayed refusal weights per (server, model). Every write commits at once, so a
    restarted verifier keeps them (pass the store's engine to share its database)."""

    def __init__(self, engine: Engine, model: ScoreModel | None = None) -> None:
        self.model = model or ScoreModel()
        create_tables(engine, _Base.metadata, "cannot create the refusals table")
        self._writes = write_sessions(engine)
        self._reads = read_sessions(engine)
        # As in ReputationStore: threads queue on SQLite's one writer, rows lock elsewhere.
        self._lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    def record(self, peer_id: str, model_id: str, detail: str = "", at: float | None = None) -> float:
        """Count one refused check; returns the server's refusal weight after it."""
        at = time.time() if at is None else float(at)
        with self._lock, self._writes.begin() as session:
            key = {"peer_id": peer_id, "model_id": model_id}
            defaults = {"count": 0, "weight": 0.0, "weight_at": at, "last_detail": ""}
            row = lock_or_create(session, RefusalRow, key, defaults)
            now = max(row.weight_at, at)
            weight = self.model.decay_refusals(row.weight, now - row.weight_at)
            row.weight = weight + self.model.decay_refusals(1.0, now - at)
            row.weight_at = now
            row.count += 1
            row.last_detail = detail[:_TEXT]
            return row.weight

    def weights(self, model_id: str, now: float | None = None) -> dict[str, float]:
        """Every server's decayed refusal weight now (servers never refused: absent)."""
        now = time.time() if now is None else now
        with self._lock, self._reads() as session:
            rows = session.scalars(select(RefusalRow).where(RefusalRow.model_id == model_id))
            return {
                row.peer_id: self.model.decay_refusals(row.weight, now - row.weight_at)
                for row in rows
            }

    def weight(self, peer_id: str, model_id: str, now: float | None = None) -> float:
        now = time.time() if now is None else now
        with self._lock, self._reads() as session:
            row = session.scalar(
                select(RefusalRow).where(
                    RefusalRow.peer_id == peer_id, RefusalRow.model_id == model_id
                )
            )
            if row is None:
                return 0.0
            return self.model.decay_refusals(row.weight, now - row.weight_at)

    def count(self, peer_id: str, model_id: str) -> int:
        with self._lock, self._reads() as session:
            value = session.scalar(
                select(RefusalRow.count).where(
                    RefusalRow.peer_id == peer_id, RefusalRow.model_id == model_id
                )
            )
            return int(value or 0)


def with_refusals(
    rep: ServerReputation, refusals: float, model: ScoreModel | None = None
) -> ServerReputation:
    """What the store says about a server, its score and state discounted by `refusals`
    (score.py: `answered_passes`). Banned stays banned with score 0."""
    if refusals <= 0:
        return rep
    model = model or ScoreModel()
    banned = rep.state == BANNED
    passes, failures = rep.pass_weight, rep.fail_weight
    answered = model.answered_passes(passes, failures, refusals)
    return dataclasses.replace(
        rep,
        state=model.state(answered, failures, banned),
        score=model.published_score(answered, failures, banned),
    )
