"""ReputationStore: SQLAlchemy-backed, restart-safe verifier history. The tests taking
`store_url` run twice: on a SQLite file and on a real PostgreSQL server
(tests/fixtures_postgres.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trustswarm.protocol.identity import Identity
from trustswarm.reputation.errors import ReputationError
from trustswarm.reputation.records import ReputationRecord, sign_record
from trustswarm.reputation.score import BANNED, OK, PROBATION, ScoreModel
from trustswarm.reputation.store import ReputationStore

MODEL = "tiny/model"
VERIFIER = Identity.generate()
SERVER_A = str(Identity.generate().peer_id)
SERVER_B = str(Identity.generate().peer_id)


def make_record(sequence: int, subject: str = SERVER_A, score: float = 0.9) -> ReputationRecord:
    now = time.time()
    return ReputationRecord(
        verifier_id=str(VERIFIER.peer_id),
        subject=subject,
        model_id=MODEL,
        start=0,
        end=4,
        score=score,
        state=OK,
        passes=6,
        failures=0,
        issued_at=now,
        expires_at=now + 600,
        sequence=sequence,
    )


def test_checks_scores_and_states(store_url: str) -> None:
    with ReputationStore(store_url) as store:
        assert store.get(SERVER_A, MODEL) is None
        t0 = 1_000_000.0
        rep = store.record_check(SERVER_A, MODEL, 0, 4, "forward", True, at=t0)
        assert (rep.state, rep.passes, rep.failures) == (PROBATION, 1, 0)
        for i in range(1, 4):
            rep = store.record_check(SERVER_A, MODEL, 0, 4, "inference", True, at=t0 + i)
        assert rep.state == PROBATION and rep.passes == 4
        rep = store.record_check(SERVER_A, MODEL, 0, 4, "inference", True, at=t0 + 3)
        assert rep.passes == 5 and rep.state == PROBATION  # seconds of decay: weight < 5
        rep = store.record_check(SERVER_A, MODEL, 0, 4, "inference", True, at=t0 + 4)
        assert rep.state == OK and rep.passes == 6
        assert rep.score == pytest.approx(7 / 8, rel=1e-4)
        rep = store.record_check(
            SERVER_A, MODEL, 0, 4, "forward", False, detail="max diff 3.5", at=t0 + 10
        )
        assert rep.failures == 1 and rep.state == PROBATION  # 7 / 13 < 0.8
        assert rep.last_failure == "forward 0:4: max diff 3.5"
        assert rep.last_checked == t0 + 10
        # Reading much later: evidence decayed toward the prior 0.5.
        later = store.get(SERVER_A, MODEL, now=t0 + 10 + 20 * ScoreModel().half_life)
        assert later.score == pytest.approx(0.5, abs=1e-4) and later.state == PROBATION
        assert [r.peer_id for r in store.all(MODEL)] == [SERVER_A]
        assert store.all("another") == []


def test_ban_is_permanent(store_url: str) -> None:
    with ReputationStore(store_url) as store:
        store.record_check(SERVER_B, MODEL, 0, 4, "forward", True)
        rep = store.ban(SERVER_B, MODEL, "signed a wrong answer", proof=b"evidence")
        assert rep.state == BANNED and rep.score == 0.0
        for _ in range(20):
            rep = store.record_check(SERVER_B, MODEL, 0, 4, "forward", True)
        assert rep.state == BANNED and rep.score == 0.0
        store.ban(SERVER_B, MODEL, "second reason", proof=b"other")
        assert store.get(SERVER_B, MODEL).ban_reason == "signed a wrong answer"
        assert store.ban_proof(SERVER_B, MODEL) == b"evidence"


def test_reports_rate_limit_window(store_url: str) -> None:
    with ReputationStore(store_url) as store:
        for i in range(3):
            store.record_report("client", SERVER_A, MODEL, upheld=False, detail="x", at=100.0 + i)
        store.record_report("other", SERVER_A, MODEL, upheld=True, detail="y", at=101.0)
        assert store.reports_since("client", 101.0) == 2
        assert store.reports_since("client", 0) == 3
        assert store.reports_since("nobody", 0) == 0
        # A report that did not hold up changes nothing about the accused.
        assert store.get(SERVER_A, MODEL) is None


def test_restart_keeps_everything(store_url: str) -> None:
    url = store_url
    store = ReputationStore(url)
    store.record_check(SERVER_A, MODEL, 0, 4, "forward", True, at=50.0)
    store.record_check(SERVER_A, MODEL, 0, 4, "forward", False, detail="bad", at=60.0)
    store.ban(SERVER_B, MODEL, "fraud", proof=b"p")
    store.record_report("client", SERVER_B, MODEL, upheld=True, detail="ok", at=70.0)
    sequences = [store.next_sequence() for _ in range(5)]
    signed = sign_record(VERIFIER, make_record(sequences[-1]))
    store.save_published(signed)
    before = store.all(now=100.0)
    store.close()

    reopened = ReputationStore(url)
    assert reopened.all(now=100.0) == before
    assert reopened.reports_since("client", 0) == 1
    assert len(reopened.checks(SERVER_A)) == 2
    assert reopened.published(MODEL) == [signed]
    more = [reopened.next_sequence() for _ in range(3)]
    assert sequences == sorted(set(sequences)) and more == sorted(set(more))
    assert more[0] > sequences[-1]
    reopened.close()


def test_published_keeps_newest(store_url: str) -> None:
    with ReputationStore(store_url) as store:
        newer = sign_record(VERIFIER, make_record(20, score=0.7))
        older = sign_record(VERIFIER, make_record(10, score=0.9))
        store.save_published(newer)
        store.save_published(older)
        assert store.published() == [newer]
        other = sign_record(VERIFIER, make_record(5, subject=SERVER_B))
        store.save_published(other)
        assert len(store.published(MODEL)) == 2
        assert store.published(MODEL, now=time.time() + 10_000) == []


def test_memory_url_and_bare_path(tmp_path: Path) -> None:
    with ReputationStore("sqlite://") as store:
        store.record_check(SERVER_A, MODEL, 0, 1, "forward", True)
        assert store.get(SERVER_A, MODEL).passes == 1
    path = tmp_path / "plain.db"
    with ReputationStore(str(path)) as store:
        store.record_check(SERVER_A, MODEL, 0, 1, "forward", True)
    assert path.exists()


def test_bad_url_is_a_clear_error() -> None:
    with pytest.raises(ReputationError):
        ReputationStore("nosuchdialect://x/y")
