"""`trustswarm reputation show --db`, run as a real subprocess on a temporary SQLite db."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trustswarm.cli import main
from trustswarm.protocol.identity import Identity
from trustswarm.reputation.store import ReputationStore

PY = [sys.executable, "-m", "trustswarm", "reputation", "show"]
MODEL = "tiny/model"
HONEST = str(Identity.generate().peer_id)
CHEAT = str(Identity.generate().peer_id)
NEW = str(Identity.generate().peer_id)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=120)


def run_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The same entry point in-process (a subprocess costs ~20 s of imports on a busy
    machine; one real subprocess run is enough to prove the wiring)."""
    code = main(["reputation", "show", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('rep') / 'verifier.db'}"
    with ReputationStore(url) as store:
        for i in range(8):
            store.record_check(HONEST, MODEL, 0, 6, "forward", True, at=1000.0 + i)
        store.record_check(CHEAT, MODEL, 0, 6, "forward", True, at=1000.0)
        store.record_check(
            CHEAT, MODEL, 0, 6, "inference", False, detail="max abs diff 0.75", at=1010.0
        )
        store.ban(CHEAT, MODEL, "signed a wrong answer")
        store.record_check(NEW, MODEL, 2, 4, "forward", True, at=1020.0)
    return url


def test_table_subprocess(db: str) -> None:
    result = run("--db", db)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == [
        "PEER",
        "ID",
        "STATE",
        "SCORE",
        "PASSED",
        "FAILED",
        "LAST",
        "FAILURE",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {HONEST, CHEAT, NEW}
    # Scores decay toward 0.5 with age (these checks are from 1970), so only the
    # state and counts are stable here; the banned score is exactly 0.
    assert rows[HONEST][1:2] + rows[HONEST][3:6] == ["probation", "8", "0", "-"]
    assert rows[CHEAT][1:5] == ["banned", "0.000", "1", "1"]
    assert "BANNED: signed a wrong answer" in " ".join(rows[CHEAT])
    assert "inference 0:6: max abs diff 0.75" in " ".join(rows[CHEAT])
    assert rows[NEW][1] == "probation" and rows[NEW][3:5] == ["1", "0"]


def test_json_and_fresh_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fresh.db"
    with ReputationStore(str(path)) as store:
        for _ in range(6):
            store.record_check(HONEST, MODEL, 0, 6, "forward", True)
    code, out, err = run_here(capsys, "--db", str(path), "--json")  # bare path: SQLite
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["peer_id"] == HONEST and row["state"] == "ok"
    assert row["score"] == pytest.approx(7 / 8, abs=1e-3)
    assert (row["passes"], row["failures"], row["last_failure"]) == (6, 0, "-")


def test_model_filter_and_empty(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_here(capsys, "--db", db, "--model-id", "other/model")
    assert code == 0 and out.strip() == "no servers recorded"
    code, out, _ = run_here(capsys, "--db", db, "--model-id", MODEL)
    assert code == 0 and len(out.strip().splitlines()) == 4


@pytest.mark.parametrize(
    "args",
    [
        ("--db", "/nonexistent/dir/verifier.db"),
        ("--db", "nosuchdialect://x"),
        (
            "--initial-peers",
            "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA",
        ),
        ("--initial-peers", "not-a-multiaddr", "--verifier", HONEST),
        ("--db", "x.db", "--verifier", HONEST),
    ],
)
def test_bad_arguments(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_here(capsys, *args)
    assert code == 2
    assert err.startswith("error:")


def test_unusable_databases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("this is not SQLite\n" * 100)
    for url in (str(not_a_db), "postgresql://nobody@127.0.0.1:1/none"):
        code, _, err = run_here(capsys, "--db", url)
        assert code == 2 and err.startswith("error: cannot open reputation database")
