"""What a verifier re-publishes each round (issue 12): servers seen lately and recent
bans, most recent first, not every row ever stored."""

from __future__ import annotations

import time

from trustswarm.models.store import ModelDir
from trustswarm.protocol.identity import Identity
from trustswarm.reputation.store import ReputationStore
from trustswarm.verifier.config import VerifierConfig
from trustswarm.verifier.daemon import Verifier


def test_republishing_skips_rows_of_servers_long_gone(tiny_model_dir, tmp_path):
    store = ReputationStore(f"sqlite:///{tmp_path / 'v.db'}")
    try:
        verifier = Verifier(
            identity=Identity.generate(),
            model_dir=ModelDir.open(tiny_model_dir),
            store=store,
            config=VerifierConfig(republish_horizon=3600.0, ban_horizon=7200.0),
        )
        model, now = verifier.model_id, time.time()
        for i, age in enumerate([10.0, 100.0, 5000.0, 90_000.0]):
            store.record_check(f"peer{i}", model, 0, 3, "forward", True, at=now - age)
        store.ban("peer3", model, "proven")  # long unchecked, but banned just now
        assert verifier.live_peers(now) == ["peer3", "peer0", "peer1"]
        assert verifier.live_peers(now + 7300.0) == []  # the ban is past its horizon too
    finally:
        store.close()
