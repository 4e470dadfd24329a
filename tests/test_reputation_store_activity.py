"""When a verifier last spot-checked and last audited each server (ReputationStore's
note_spot_check / note_audit), and a database made before those columns existed: it
opens, keeps its rows and gains the columns. On SQLite and a real PostgreSQL
(`store_url`, tests/fixtures_postgres.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, inspect

from trustswarm.protocol.identity import Identity
from trustswarm.reputation.store import ReputationStore

MODEL = "tiny/model"
SERVER = str(Identity.generate().peer_id)
NEW_COLUMNS = ("last_spot_check", "last_audit")


def test_notes_keep_the_newest_time(store_url: str) -> None:
    with ReputationStore(store_url) as store:
        store.record_check(SERVER, MODEL, 0, 4, "forward", True, at=1000.0)
        rep = store.get(SERVER, MODEL, now=1000.0)
        assert rep.last_spot_check is None and rep.last_audit is None
        store.note_spot_check(SERVER, MODEL, at=1005.0)
        store.note_audit(SERVER, MODEL, at=1010.0)
        store.note_spot_check(SERVER, MODEL, at=1001.0)  # late, out of order: ignored
        rep = store.get(SERVER, MODEL, now=1020.0)
        assert (rep.last_spot_check, rep.last_audit) == (1005.0, 1010.0)
        assert rep.passes == 1  # a note is no evidence
        with pytest.raises(ValueError):
            store.note_audit(SERVER, MODEL, at=math.nan)
    with ReputationStore(store_url) as again:  # committed: survives a restart
        assert again.get(SERVER, MODEL).last_audit == 1010.0


@settings(max_examples=30, deadline=None)
@given(times=st.lists(st.floats(0, 4e9), min_size=1, max_size=6))
def test_the_note_is_the_maximum(times: list[float]) -> None:
    with ReputationStore("sqlite:///:memory:") as store:
        for at in times:
            store.note_audit(SERVER, MODEL, at=at)
        assert store.get(SERVER, MODEL).last_audit == max(times)


def test_a_database_without_the_new_columns_opens_and_keeps_its_rows(store_url: str) -> None:
    with ReputationStore(store_url) as store:
        store.record_check(SERVER, MODEL, 0, 4, "forward", False, "wrong", at=2000.0)
        store.ban(SERVER, MODEL, "signed wrong forward answer", b"proof")
    engine = create_engine(store_url)
    try:  # as an older trustswarm made it: the columns were not there
        with engine.begin() as conn:
            for column in NEW_COLUMNS:
                conn.exec_driver_sql(f"ALTER TABLE servers DROP COLUMN {column}")
        assert not set(NEW_COLUMNS) & {c["name"] for c in inspect(engine).get_columns("servers")}
    finally:
        engine.dispose()
    with ReputationStore(store_url) as store:
        rep = store.get(SERVER, MODEL)
        assert rep.state == "banned" and rep.ban_reason == "signed wrong forward answer"
        assert rep.failures == 1 and rep.last_spot_check is None
        store.note_spot_check(SERVER, MODEL, at=2100.0)
        assert store.get(SERVER, MODEL).last_spot_check == 2100.0
        assert store.ban_proof(SERVER, MODEL) == b"proof"
    with ReputationStore(store_url) as store:  # a second start changes nothing
        assert store.get(SERVER, MODEL).last_spot_check == 2100.0
