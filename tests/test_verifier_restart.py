"""A verifier restarted on the same database keeps its history and keeps publishing:
records keep arriving over gossip with ever higher sequence numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.tools.anyio_service import background_trio_service

from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier, wait_until  # noqa: F401 - fixture
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import (
    connect_peers,
    make_host,
    parse_peer_addr,
    running_host,
)
from trustswarm.reputation.gossip import follow_records, running_pubsub
from trustswarm.reputation.records import (
    REPUTATION_NAMESPACE,
    ReputationValidator,
    SignedReputationRecord,
    record_key,
)
from trustswarm.testing.local_swarm import LocalSwarm
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

        await swarm.start_task(run)
        return scope

    return swarm.loop.run(launch)


def dht_record(swarm: LocalSwarm, key: str) -> SignedReputationRecord | None:
    """The record a fresh peer reads from the swarm's DHT (as a client's refresh does)."""

    async def run() -> SignedReputationRecord | None:
        host = make_host(Identity.generate())
        async with running_host(host, []):
            dht = KadDHT(host, DHTMode.CLIENT)
            dht.register_validator(REPUTATION_NAMESPACE, ReputationValidator())
            async with background_trio_service(dht):
                await connect_peers(host, dht, swarm.initial_peers)
                with trio.move_on_after(5):
                    value = await dht.get_value(key)
                    return SignedReputationRecord.from_bytes(value) if value else None
        return None

    return swarm.loop.run(run)


def test_restart_keeps_history_and_publishing(tiny_model_dir: Path, store_url: str):
    """On a SQLite file and on a real PostgreSQL database (tests/fixtures_postgres.py)."""
    swarm = LocalSwarm(tiny_model_dir)
    try:
        servers = [swarm.start_server((0, 3)), swarm.start_server((3, 6))]
        received: list[SignedReputationRecord] = []
        collector = collect_gossip(swarm, received)
        identity = Identity.generate()
        db = store_url
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
            # Publishing goes on: the DHT soon holds a newer record with the old evidence.
            # (Gossip too, best effort: py-libp2p's pubsub on a server may keep the
            # previous run's stream for the same peer id and skip the new one.)
            key = record_key(str(identity.peer_id), servers[0].peer_id, model_id)
            newest: list[SignedReputationRecord] = []

            def republished() -> bool:
                record = dht_record(swarm, key)
                newest[:] = [record] if record else []
                return record is not None and record.record.sequence > last_sequence

            wait_until(republished, timeout=20, every=0.5)
            record = newest[0].record
            assert record.passes >= before[record.subject] and record.failures == 0
            wait_until(
                lambda: sum(r.passes for r in second.store.all(model_id)) > sum(before.values()),
                20,
            )
        finally:
            stop_verifier(swarm, second)

        async def stop() -> None:
            collector.cancel()

        swarm.loop.run(stop)
    finally:
        swarm.close()
