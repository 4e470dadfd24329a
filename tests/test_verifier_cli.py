"""`trustswarm verifier start` as a user runs it: real processes next to a real node."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.daemons import launch, stop
from trustswarm.cli import main
from trustswarm.protocol.identity import Identity
from trustswarm.reputation.store import ReputationStore
from trustswarm.testing.local_swarm import LocalSwarm

pytestmark = pytest.mark.timeout(120)


def test_verifier_prints_its_address_checks_the_node_and_stops_cleanly(
    tiny_model_dir: Path, tmp_path: Path, store_url: str
):
    """`--db` a SQLite file, then `postgresql+psycopg://` on a real server."""
    swarm = LocalSwarm(tiny_model_dir)  # the node in-process; the verifier as a user runs it
    try:
        node = swarm.start_server((0, 6))
        key, db = tmp_path / "verifier.key", store_url
        verifier, addr = launch(
            "verifier", "start", "--model", str(tiny_model_dir), "--identity", str(key),
            "--db", db, "--initial-peers", node.addrs[0], "--check-every", "0.2",
        )  # fmt: skip
        try:
            assert addr.endswith(f"/p2p/{Identity.load_or_create(key).peer_id}")
            with ReputationStore(db) as store:
                deadline = time.monotonic() + 30
                while not store.checks(node.peer_id):
                    assert time.monotonic() < deadline, "the verifier never checked the node"
                    time.sleep(0.2)
                assert all(row.passed for row in store.checks(node.peer_id))
        finally:
            assert stop(verifier) == 0
    finally:
        swarm.close()


def test_bad_flags_give_a_clear_error(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    base = ["verifier", "start", "--identity", str(tmp_path / "v.key")]
    peer = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQt58WyNGZLHmtw5YsN3Jy3SGTfUU7yUuJvTXZ8hfq7Qf"
    model = ["--model", str(tiny_model_dir)]
    cases = [
        ([*base, "--model", str(tmp_path / "missing"), "--initial-peers", peer], "model"),
        ([*base, *model, "--initial-peers", "/ip4/1.2.3.4/tcp/1"], "p2p"),
        ([*base, *model, "--initial-peers", peer, "--db", "nope://x"], "database"),
        ([*base, *model, "--initial-peers", peer, "--check-every", "0"], "positive"),
        ([*base, *model], "--initial-peers"),
    ]
    for argv, word in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err[-500:])
        assert word in err and "Traceback" not in err, err[-500:]
