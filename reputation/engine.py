"""Opening the reputation database, and the few SQL idioms that keep concurrent writers safe.

Several verifier processes (or threads with their own store) may write one database. A
write is a read-modify-write of one row (a server's weights, the sequence counter, a
published record, a refusal weight), so every write transaction first locks its row:

* PostgreSQL (and other servers): `SELECT ... FOR UPDATE` on the row, in a transaction at
  the default READ COMMITTED level. A missing row is created with
  `INSERT ... ON CONFLICT DO NOTHING` (two writers creating it at once both go on with
  the one row), then locked. No transaction locks two rows, so there are no deadlocks.
* SQLite: one writer at a time for the whole file. Write transactions start with
  `BEGIN IMMEDIATE` (a deferred transaction that read first could not upgrade to a write
  once another process committed), other processes wait up to `busy_timeout`.

Tables are created under a PostgreSQL advisory lock (or SQLite's write lock), so
verifiers started at the same moment on an empty database do not race to create them.
Columns added to a table since a database was made are added to it then (nullable
ones only), so an older database opens and keeps its rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, MetaData, create_engine, event, insert, inspect, select
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from .errors import ReputationError

_WRITE = "trustswarm_write"  # execution option: this connection's transactions write
_CREATE_LOCK = 0x7472757374  # pg_advisory_xact_lock key while creating tables
SQLITE_BUSY_MS = 10_000

Row = TypeVar("Row", bound=DeclarativeBase)


def database_url(url: str) -> str:
    """A SQLAlchemy URL; a bare path means a SQLite file."""
    if "://" in url:
        return url
    return f"sqlite:///{Path(url).expanduser()}"


def open_engine(url: str) -> Engine:
    """An engine for `url` (a SQLAlchemy URL or a SQLite path), or a clear ReputationError."""
    full = database_url(url)
    try:
        if full.startswith("sqlite:///") and full != "sqlite:///:memory:":
            Path(full.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if full.startswith("sqlite"):
            engine = create_engine(full)
            _sqlite_transactions(engine)
        else:
            # A long-running verifier outlives server restarts: test pooled connections.
            engine = create_engine(full, pool_pre_ping=True)
    except ImportError as exc:
        hint = " (pip install 'trustswarm[postgres]')" if full.startswith("postgres") else ""
        raise ReputationError(
            f"cannot open reputation database {url!r}: no driver: {exc}{hint}"
        ) from None
    except (ArgumentError, SQLAlchemyError, OSError) as exc:
        raise ReputationError(f"cannot open reputation database {url!r}: {exc}") from None
    return engine


def create_tables(engine: Engine, metadata: MetaData, failure: str) -> None:
    """Create the missing tables of `metadata`, one process at a time; a failure raises
    ReputationError(f"{failure}: <why>")."""
    try:
        with writer(engine).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_CREATE_LOCK})")
            metadata.create_all(conn)
            add_missing_columns(conn, metadata)
    except (SQLAlchemyError, OSError) as exc:
        raise ReputationError(f"{failure}: {exc}") from None


def add_missing_columns(conn: Connection, metadata: MetaData) -> list[str]:
    """ALTER TABLE ... ADD COLUMN for each column of `metadata` an existing table lacks
    (a database made by an older version); returns "table.column" for each one added."""
    inspector = inspect(conn)
    quote = conn.dialect.identifier_preparer.quote
    added = []
    for table in metadata.sorted_tables:
        have = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable:  # old rows would have no value for it
                raise ReputationError(f"cannot add non-nullable {table.name}.{column.name}")
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(
                f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}"
            )
            added.append(f"{table.name}.{column.name}")
    return added


def writer(engine: Engine) -> Engine:
    """`engine` for write transactions (on SQLite they take the write lock at BEGIN)."""
    return engine.execution_options(**{_WRITE: True})


def write_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(writer(engine), expire_on_commit=False)


def read_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def lock_or_create(
    session: Session, model: type[Row], key: dict[str, Any], defaults: dict[str, Any]
) -> Row:
    """The row of `model` with `key`, locked until the transaction ends; created from
    `key | defaults` first if missing (by whichever concurrent writer gets there first)."""
    query = select(model).filter_by(**key).with_for_update()
    row = session.scalar(query)
    if row is None:
        insert_ignore(session, model, key | defaults)
        row = session.scalar(query.execution_options(populate_existing=True))
    if row is None:  # only if someone deleted it in between: the store never deletes
        raise ReputationError(f"{model.__tablename__} row {key} vanished while writing")
    return row


def insert_ignore(session: Session, model: type[DeclarativeBase], values: dict[str, Any]) -> None:
    """INSERT the row unless a unique key already holds one (which then stays as it is)."""
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        session.execute(dialect_insert(model).values(**values).on_conflict_do_nothing())
        return
    try:  # other databases: a savepoint that a duplicate key rolls back
        with session.begin_nested():
            session.execute(insert(model).values(**values))
    except IntegrityError:
        pass


def _sqlite_transactions(engine: Engine) -> None:
    """SQLite as its own docs advise with pysqlite: we emit BEGIN ourselves, IMMEDIATE
    for writes, so a read-modify-write cannot interleave with another process's."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN from the driver
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")  # first: WAL may wait too
        cursor.execute("PRAGMA journal_mode=WAL")  # readers (the CLI) do not block writers
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")
