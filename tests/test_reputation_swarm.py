"""Reputation through a real loopback swarm: servers relay and store records, clients
that trust the verifier route around servers it bans or scores low, clients that do
not trust it behave as before.

The "verifier" here is a bare publisher (a libp2p host with pubsub, a DHT and a
RecordPublisher signing with a ReputationStore's sequence numbers); the real
daemon with spot-checks lives in verifier/ and has its own tests.
"""

from __future__ import annotations

import time
from pathlib import Path

import multiaddr
import pytest
import torch
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.tools.anyio_service import background_trio_service

from trustswarm.cli import main
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.protocol.announcement import AnnouncementValidator
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.protocols import DHT_NAMESPACE
from trustswarm.protocol.transport import connect_peers, make_host
from trustswarm.reputation.gossip import running_pubsub
from trustswarm.reputation.publish import RecordPublisher
from trustswarm.reputation.records import (
    REPUTATION_NAMESPACE,
    ReputationRecord,
    ReputationValidator,
)
from trustswarm.reputation.store import ReputationStore
from trustswarm.testing.local_swarm import LocalSwarm

pytestmark = pytest.mark.timeout(180)


class Publisher:
    """A verifier's publishing side, running in the swarm's background loop."""

    def __init__(self, swarm: LocalSwarm, db_url: str) -> None:
        self.swarm = swarm
        self.identity = Identity.generate()
        self.store = ReputationStore(db_url)
        self.publisher: RecordPublisher | None = None

        async def launch() -> None:
            await swarm.start_task(self._run)

        swarm.loop.run(launch)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        host = make_host(self.identity)
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            async with running_pubsub(host) as pubsub:
                dht = KadDHT(host, DHTMode.SERVER)
                dht.register_validator(DHT_NAMESPACE, AnnouncementValidator())
                dht.register_validator(REPUTATION_NAMESPACE, ReputationValidator())
                async with background_trio_service(dht):
                    await connect_peers(host, dht, [s.addrs[0] for s in self.swarm.servers])
                    self.publisher = RecordPublisher(host, dht, pubsub, self.identity, self.store)
                    task_status.started()
                    await trio.sleep_forever()

    @property
    def peer_id(self) -> str:
        return str(self.identity.peer_id)

    def publish(self, subject: str, score: float, state: str) -> None:
        now = time.time()
        record = ReputationRecord(
            verifier_id=self.peer_id,
            subject=subject,
            model_id=self.swarm.model_dir.manifest.model_id,
            start=0,
            end=self.swarm.model_dir.num_blocks,
            score=score,
            state=state,
            passes=10,
            failures=0 if state == "ok" else 3,
            issued_at=now,
            expires_at=now + 600,
            sequence=self.store.next_sequence(),
        )
        assert self.swarm.loop.run(self.publisher.publish, [record]) == 1


def wait_for(condition, timeout: float = 15.0) -> float:  # noqa: ANN001 - a callable
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)
    return time.monotonic() - began


def test_trusting_client_routes_around_bad_servers(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    swarm = LocalSwarm(tiny_model_dir)
    clients: list[DistributedModelForCausalLM] = []
    try:
        good, cheat, weak = (swarm.start_server((0, 6)) for _ in range(3))
        verifier = Publisher(swarm, f"sqlite:///{tmp_path / 'verifier.db'}")
        # Published before the client exists: it must learn this from the DHT.
        verifier.publish(cheat.peer_id, 0.0, "banned")

        plain = DistributedModelForCausalLM.from_pretrained(tiny_model_dir, swarm.initial_peers)
        clients.append(plain)
        trusting = DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir,
            swarm.initial_peers,
            trusted_verifiers=[verifier.peer_id],
            min_reputation=0.5,
        )
        clients.append(trusting)
        trust = trusting.swarm.view.trust
        assert plain.swarm.view.trust is None

        def usable(model: DistributedModelForCausalLM) -> set[str]:
            return {a.peer_id for a in model.swarm.view.usable()}

        everyone = {good.peer_id, cheat.peer_id, weak.peer_id}
        wait_for(lambda: usable(plain) == everyone and len(usable(trusting)) == 2)
        assert usable(trusting) == {good.peer_id, weak.peer_id}  # ban read from the DHT
        assert trust.banned(cheat.peer_id)

        # Pushed over gossipsub while the client runs (relayed by the servers).
        began = time.monotonic()
        verifier.publish(good.peer_id, 0.95, "ok")
        verifier.publish(weak.peer_id, 0.3, "probation")
        published = time.monotonic() - began
        wait_for(lambda: usable(trusting) == {good.peer_id})
        print(
            f"\n[reputation] 2 records published (gossip + DHT put) in {published:.2f} s; "
            f"client excluded the weak server {time.monotonic() - began:.2f} s after the start"
        )
        assert usable(plain) == everyone  # no trusted verifier: nothing changes

        ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(0))
        out = trusting.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 9)
        for _ in range(10):
            assert [h.server.peer_id for h in trusting.swarm.view.inference_route(0, 6)] == [
                good.peer_id
            ]
        # A newer, better record lifts the weak server again.
        verifier.publish(weak.peer_id, 0.9, "ok")
        wait_for(lambda: usable(trusting) == {good.peer_id, weak.peer_id})

        # `trustswarm reputation show --initial-peers ... --verifier ID` reads the DHT.
        capsys.readouterr()
        args = ["reputation", "show", "--initial-peers", *swarm.initial_peers]
        assert main([*args, "--verifier", verifier.peer_id]) == 0
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
        assert rows[cheat.peer_id][1:4] == [verifier.peer_id, "banned", "0.000"]
        assert rows[good.peer_id][1:4] == [verifier.peer_id, "ok", "0.950"]
        assert rows[weak.peer_id][1:4] == [verifier.peer_id, "ok", "0.900"]
    finally:
        for client in clients:
            client.close()
        swarm.close()
