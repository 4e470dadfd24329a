"""Several verifier processes, each with several threads, writing one reputation store at
once: no update is lost (every check, refusal and sequence number counts once) and the
newest published record wins. On a real PostgreSQL server and on a SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trustswarm.protocol.identity import Identity
from trustswarm.reputation.refusals import RefusalLedger
from trustswarm.reputation.store import ReputationStore

pytestmark = pytest.mark.timeout(120)

MODEL = "tiny/model"
PROCESSES, THREADS, ROUNDS = 3, 3, 15
WRITER = Path(__file__).with_name("store_writer.py")


def run_writers(url: str, key: Path, peer: str) -> list[int]:
    """Start every writer, let them all go at once, return every sequence number they got."""
    argv = [sys.executable, str(WRITER), url, str(key), peer, MODEL, str(THREADS), str(ROUNDS)]
    procs = [
        subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(PROCESSES)
    ]
    try:
        for proc in procs:  # every store is open (tables created concurrently) before "go"
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read()[-2000:])
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        sequences = []
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-2000:]
            sequences += json.loads(out.strip().splitlines()[-1])
        return sequences
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_concurrent_writers_lose_no_update(store_url: str, tmp_path: Path) -> None:
    key = tmp_path / "verifier.key"
    identity = Identity.load_or_create(key)
    peer = str(Identity.generate().peer_id)
    total = PROCESSES * THREADS * ROUNDS

    sequences = run_writers(store_url, key, peer)

    assert len(sequences) == total and len(set(sequences)) == total  # none handed out twice
    with ReputationStore(store_url) as store:
        rep = store.get(peer, MODEL, now=1_000_000.0)
        failures = PROCESSES * THREADS * (ROUNDS // 2)
        assert (rep.passes, rep.failures) == (total - failures, failures)
        assert rep.pass_weight == pytest.approx(total - failures)
        assert rep.fail_weight == pytest.approx(failures)
        assert len(store.checks(peer, limit=10 * total)) == total
        assert [r.peer_id for r in store.all(MODEL)] == [peer]  # one row, however created
        ledger = RefusalLedger(store.engine, store.model)
        assert ledger.count(peer, MODEL) == total
        assert ledger.weight(peer, MODEL, now=1_000_000.0) == pytest.approx(total)
        (published,) = store.published(MODEL)
        assert published.record.sequence == max(sequences)  # the newest record won
        assert published.record.verifier_id == str(identity.peer_id)
        assert store.next_sequence() > max(sequences)
