"""A verifier restarted on the same database keeps its history and keeps publishing:
records keep arriving over gossip with ever higher sequence numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.swarm import LocalSwarm
from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier, wait_until  # noqa: F401 - fixture
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host
from trustswarm.reputation.gossip import follow_records, running_pubsub
from trustswarm.reputation.records import SignedReputationRecord
from trustswarm.verifier.daemon import VerifierConfig
from trustswarm.verifier.spotcheck import CheckConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

CONFIG = VerifierConfig(checks=CheckConfig(check_every=0.3), republish_every=1.0)


def collect_gossip(swarm: LocalSwarm, received: list[SignedReputationRecord]) -> trio.CancelScope:
    """A bare peer following the record topic through a server (as a client does)."""

    async def launch() -> trio.CancelScope:
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                host = make_host(Identity.generate())
                async with running_host(host, []), running_pubsub(host) as pubsub:
                    await host.connect(parse_peer_addr(swarm.servers[0].addrs[0]))
                    await follow_records(
                        pubsub, swarm.model_dir.manifest.model_id, received.append, task_status
                    )

        await swarm._nursery.start(run)
        return scope

    return swarm.loop.run(launch)


def test_restart_keeps_history_and_publishing(tiny_model_dir: Path, tmp_path: Path):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        servers = [swarm.start_server((0, 3)), swarm.start_server((3, 6))]
        received: list[SignedReputationRecord] = []
        collector = collect_gossip(swarm, received)
        identity = Identity.generate()
        db = f"sqlite:///{tmp_path / 'verifier.db'}"
        model_id = swarm.model_dir.manifest.model_id

        first = start_verifier(swarm, db, CONFIG, identity=identity, seed=1)

        def passes() -> int:
            return sum(r.passes for r in first.store.all(model_id))

        wait_until(lambda: passes() >= 4 and len(received) >= 2, timeout=40)
        stop_verifier(swarm, first)
        before = {r.peer_id: r.passes for r in first.store.all(model_id)}
        last_sequence = max(r.record.sequence for r in received)
        assert set(before) == {s.peer_id for s in servers}
        assert {r.record.verifier_id for r in received} == {str(identity.peer_id)}

        second = start_verifier(swarm, db, CONFIG, identity=identity, seed=2)
        try:
            # History is there at once, before any new check.
            after = {r.peer_id: r.passes for r in second.store.all(model_id)}
            assert all(after[p] >= n for p, n in before.items())
            count = len(received)
            wait_until(lambda: any(r.record.sequence > last_sequence for r in received[count:]), 20)
            newest = max(received[count:], key=lambda r: r.record.sequence).record
            # The new records carry the old evidence (counts never go back).
            assert newest.passes >= before[newest.subject]
            assert newest.failures == 0 and newest.state in ("ok", "probation")
            wait_until(
                lambda: sum(r.passes for r in second.store.all(model_id)) > sum(before.values()), 20
            )
        finally:
            stop_verifier(swarm, second)

        async def stop() -> None:
            collector.cancel()

        swarm.loop.run(stop)
    finally:
        swarm.close()
