"""Discovery under many and hostile announcements (issue 12): a node whose DHT store holds
more announcements than one info answer can carry still answers info, and hostile
records in the store never reach or break a client. Real nodes on loopback."""

from __future__ import annotations

import json
import time

import pytest
import torch

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.protocol.announcement import (
    Announcement,
    SignedAnnouncement,
    announcement_key,
)
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.info import call_info
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host
from trustswarm.testing.local_swarm import LocalSwarm

pytestmark = pytest.mark.timeout(120)


def foreign(model_id: str, digest: str, **overrides: object) -> tuple[str, bytes]:
    """A validly signed announcement of a fresh identity (what an attacker makes for free)
    with `overrides`, signed without our field checks; its DHT key."""
    who = Identity.generate()
    now = time.time()
    fields = {
        "peer_id": str(who.peer_id), "model_id": model_id, "start": 0, "end": 3,
        "weights_digest": digest, "dtype": "float32", "throughput": 100.0,
        "addrs": ("/ip4/127.0.0.1/tcp/9",), "issued_at": now, "expires_at": now + 120,
    } | overrides  # fmt: skip
    ann = Announcement(**fields)
    return announcement_key(model_id, ann.peer_id), SignedAnnouncement(
        ann, who.sign(ann.canonical_bytes())
    ).to_bytes()


def store(server, key: str, value: bytes) -> None:  # noqa: ANN001 - a BlockServer
    server.dht.value_store.put(key.encode(), value, validity=time.time() + 120)


def ask_info(swarm: LocalSwarm, addr: str):  # noqa: ANN201
    async def run():  # noqa: ANN202
        host = make_host(Identity.generate())
        async with running_host(host, []):
            info = parse_peer_addr(addr)
            await host.connect(info)
            return await call_info(host, info.peer_id, 10.0)

    return swarm.loop.run(run)


def test_info_answers_with_more_announcements_than_fit(tiny_model_dir):
    """60 announcements (30 broke every info answer before): each answer carries a random
    sample that fits; a few answers together cover all of them."""
    swarm = LocalSwarm(tiny_model_dir)
    try:
        node = swarm.start_server((0, 3))
        server = node.server
        digest = server.runner.weights_digest
        keys = set()
        for _ in range(60):
            key, value = foreign(server.model_id, digest)
            store(server, key, value)
            keys.add(json.loads(value)["announcement"]["peer_id"])
        seen: set[str] = set()
        for _ in range(12):
            info = ask_info(swarm, node.addrs[0])
            assert 10 <= len(info.known) < 60
            seen |= {k.announcement.peer_id for k in info.known}
        assert len(seen & keys) >= 55  # random samples: nearly all seen after 12 answers
    finally:
        swarm.close()


def test_hostile_records_in_a_store_never_break_a_client(tiny_model_dir):
    """Records that are genuinely signed but hostile (NaN/Infinity/1e308 throughput, an
    unparsable address, a span beyond the model, an infinite lifetime) sit in an honest
    node's store; a new client still starts, routes only through honest servers and
    generates."""
    swarm = LocalSwarm(tiny_model_dir)
    try:
        first = swarm.start_server((0, 3))
        swarm.start_server((3, 6))
        server = first.server
        digest = server.runner.weights_digest
        hostile = [
            {"throughput": float("nan")},
            {"throughput": float("inf")},
            {"throughput": 1e308},
            {"addrs": ("not-a-multiaddr",)},
            {"start": 0, "end": 40},
            {"expires_at": float("inf")},
        ]
        for overrides in hostile:
            key, value = foreign(server.model_id, digest, **overrides)
            store(server, key, value)  # the raw store: as if the validator had let it in
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir, swarm.initial_peers
        ) as client:
            honest = {s.peer_id for s in swarm.servers}
            assert set(client.swarm.view.servers) == honest
            # Replica diversity counts where connections came from (here all loopback).
            assert client.swarm.view.observed == dict.fromkeys(honest, "127.0.0.1")
            out = client.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
            assert out.shape == (1, 7)
            client.run_async(client.swarm.refresh)  # refreshes keep working
            assert set(client.swarm.view.servers) == honest
    finally:
        swarm.close()


def test_verified_records_are_checked_once_and_still_expire(monkeypatch):
    from trustswarm.node.peers import VerifiedRecords

    _, value = foreign("m", "b" * 64, issued_at=time.time() - 100, expires_at=time.time() + 2)
    calls = []
    original = SignedAnnouncement.verify

    def counting(self, now=None):  # noqa: ANN001, ANN202
        calls.append(1)
        return original(self, now)

    monkeypatch.setattr(SignedAnnouncement, "verify", counting)
    verified = VerifiedRecords(max_entries=4)
    assert all(verified.get(value) is not None for _ in range(50))
    assert len(calls) == 1  # one signature check for 50 reads
    assert verified.get(b"garbage") is None and verified.get(b"garbage") is None
    time.sleep(2.1)
    assert verified.get(value) is None  # expired: gone, though cached
