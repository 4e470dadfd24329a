"""The reputation store's tables (SQLAlchemy 2.x ORM). See store.py for how they are used."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ServerRow(Base):
    __tablename__ = "servers"
    __table_args__ = (UniqueConstraint("peer_id", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[str] = mapped_column(String(128), index=True)
    model_id: Mapped[str] = mapped_column(String(256))
    first_seen: Mapped[float] = mapped_column(Float)
    passes: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    pass_weight: Mapped[float] = mapped_column(Float, default=0.0)
    fail_weight: Mapped[float] = mapped_column(Float, default=0.0)
    weights_at: Mapped[float] = mapped_column(Float)
    last_checked: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_failure_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    start: Mapped[int | None] = mapped_column(Integer, nullable=True)
    end: Mapped[int | None] = mapped_column(Integer, nullable=True)
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    ban_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    ban_proof: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    banned_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Added later: engine.create_tables adds them to older databases (nullable).
    last_spot_check: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_audit: Mapped[float | None] = mapped_column(Float, nullable=True)


class CheckRow(Base):
    __tablename__ = "checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[str] = mapped_column(String(128), index=True)
    model_id: Mapped[str] = mapped_column(String(256))
    start: Mapped[int] = mapped_column(Integer)
    end: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(64))
    passed: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[float] = mapped_column(Float, index=True)


class ReportRow(Base):
    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reporter: Mapped[str] = mapped_column(String(128), index=True)
    accused: Mapped[str] = mapped_column(String(128), index=True)
    model_id: Mapped[str] = mapped_column(String(256))
    upheld: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[float] = mapped_column(Float, index=True)


class PublishedRow(Base):
    """The newest record this verifier signed per (subject, model)."""

    __tablename__ = "published"
    __table_args__ = (UniqueConstraint("verifier_id", "subject", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    verifier_id: Mapped[str] = mapped_column(String(128))
    subject: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[str] = mapped_column(String(256))
    sequence: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class CounterRow(Base):
    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
