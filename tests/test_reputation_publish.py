"""RecordPublisher and the record topic on real libp2p hosts over loopback.

Publisher -> relay -> subscriber (no direct connection between publisher and
subscriber): paced records arrive in order through the relay and land in the DHT;
forged, expired, other-model and replayed older records are dropped by the topic
validator, so they are neither delivered nor relayed.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import AsyncExitStack

import multiaddr
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host, running_host
from trustswarm.reputation.gossip import RecordFilter, follow_records, running_pubsub
from trustswarm.reputation.publish import RecordPublisher
from trustswarm.reputation.records import (
    REPUTATION_NAMESPACE,
    REPUTATION_TOPIC,
    ReputationRecord,
    ReputationValidator,
    SignedReputationRecord,
    sign_record,
)
from trustswarm.reputation.store import ReputationStore

MODEL = "tiny/model"
VERIFIER = Identity.generate()
MALLORY = Identity.generate()
SUBJECTS = [str(Identity.generate().peer_id) for _ in range(3)]


def record(sequence: int, subject: str = SUBJECTS[0], **overrides: object) -> ReputationRecord:
    now = time.time()
    fields: dict[str, object] = {
        "verifier_id": str(VERIFIER.peer_id),
        "subject": subject,
        "model_id": MODEL,
        "start": 0,
        "end": 4,
        "score": 0.5,
        "state": "probation",
        "passes": 0,
        "failures": 0,
        "issued_at": now,
        "expires_at": now + 600,
        "sequence": sequence,
    }
    fields.update(overrides)
    return ReputationRecord(**fields)  # type: ignore[arg-type]


def test_record_filter_unit() -> None:
    records = RecordFilter(MODEL)
    first = sign_record(VERIFIER, record(5)).to_bytes()
    assert records.check(first) is not None
    assert records.check(first) is not None  # the same record again: fine
    assert records.check(sign_record(VERIFIER, record(4)).to_bytes()) is None  # replay
    assert records.check(sign_record(VERIFIER, record(1, subject=SUBJECTS[1])).to_bytes())
    assert records.check(sign_record(VERIFIER, record(9, model_id="other")).to_bytes()) is None
    assert records.check(b"garbage") is None
    assert (records.accepted, records.rejected) == (3, 3)


def test_publisher_relay_subscriber(tmp_path) -> None:  # noqa: ANN001 - pytest fixture
    trio.run(_scenario, tmp_path)


async def _node(stack: AsyncExitStack, identity: Identity):  # noqa: ANN202 - test helper
    host = make_host(identity)
    await stack.enter_async_context(
        running_host(host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
    )
    pubsub = await stack.enter_async_context(running_pubsub(host))
    dht = KadDHT(host, DHTMode.SERVER)
    dht.register_validator(REPUTATION_NAMESPACE, ReputationValidator())
    await stack.enter_async_context(background_trio_service(dht))
    return host, pubsub, dht


async def _link(a, b) -> None:  # noqa: ANN001 - (host, pubsub, dht) tuples
    await a[0].connect(PeerInfo(b[0].get_id(), b[0].get_addrs()))
    await a[2].add_peer(b[0].get_id())
    await b[2].add_peer(a[0].get_id())


async def _scenario(tmp_path) -> None:  # noqa: ANN001
    topic = REPUTATION_TOPIC(MODEL)
    received: list[SignedReputationRecord] = []
    async with AsyncExitStack() as stack:
        publisher = await _node(stack, VERIFIER)
        relay = await _node(stack, Identity.generate())
        subscriber = await _node(stack, Identity.generate())
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        with trio.fail_after(30):
            await nursery.start(follow_records, relay[1], MODEL, None)
            await nursery.start(follow_records, subscriber[1], MODEL, received.append)
            await _link(publisher, relay)
            await _link(relay, subscriber)
            await publisher[1].wait_for_subscription(relay[0].get_id(), topic, timeout=10)
            await relay[1].wait_for_mesh(subscriber[0].get_id(), topic, timeout=10)

            store = ReputationStore(f"sqlite:///{tmp_path / 'v.db'}")
            out = RecordPublisher(
                publisher[0], publisher[2], publisher[1], VERIFIER, store, pace_seconds=0.12
            )
            good = [record(store.next_sequence(), SUBJECTS[i % 3]) for i in range(12)]
            began = trio.current_time()
            assert await out.publish(good) == 12
            assert trio.current_time() - began >= 11 * 0.12 * 0.95  # paced

            # Bad records published raw (RecordPublisher refuses other signers).
            forged = SignedReputationRecord(
                record(10**15), MALLORY.sign(record(10**15).canonical_bytes())
            )
            expired = sign_record(VERIFIER, record(10**15, issued_at=1.0, expires_at=2.0))
            other_model = sign_record(VERIFIER, record(10**15, model_id="other/model"))
            replay = sign_record(VERIFIER, dataclasses.replace(good[0], sequence=1))
            for bad in (forged, expired, other_model, replay):
                await publisher[1].publish(topic, bad.to_bytes())
                await trio.sleep(0.12)
            # A final good record marks the end of the stream.
            last = sign_record(VERIFIER, record(store.next_sequence(), SUBJECTS[0], score=0.9))
            await out.publish([last])
            while not received or received[-1] != last:
                await trio.sleep(0.05)

            # The DHT holds the newest record per subject: stored at the publisher's DHT
            # neighbour, and readable from the subscriber through the network.
            signed_all = [*(sign_record(VERIFIER, g) for g in good), last]
            for subject in SUBJECTS:
                newest = max(
                    (r for r in signed_all if r.record.subject == subject),
                    key=lambda r: r.record.sequence,
                )
                stored = relay[2].value_store.get(newest.record.key.encode())
                assert stored is not None
                assert SignedReputationRecord.from_bytes(stored.value) == newest
                got = await subscriber[2].get_value(newest.record.key)
                assert SignedReputationRecord.from_bytes(got) == newest

        sequences = [r.record.sequence for r in received]
        assert sequences == [r.sequence for r in good] + [last.record.sequence]
        assert all(r.record.verifier_id == str(VERIFIER.peer_id) for r in received)
        # The publisher's store kept the newest record per subject, for re-publishing.
        assert {r.record.subject for r in store.published(MODEL)} == set(SUBJECTS)
        store.close()


def test_restarted_publisher_is_heard() -> None:
    """A verifier restarted at once (same identity) must not reuse gossip message ids
    of its previous run: the subscriber would drop its fresh records as duplicates."""
    trio.run(_restart_scenario)


async def _restart_scenario() -> None:
    topic = REPUTATION_TOPIC(MODEL)
    received: list[SignedReputationRecord] = []
    async with AsyncExitStack() as stack:
        subscriber = await _node(stack, Identity.generate())
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(follow_records, subscriber[1], MODEL, received.append)
        with trio.fail_after(30):
            # Message ids of the first run: (verifier, start second + 1..8); the second
            # run starts a few seconds later and would count from there again.
            for batch in (range(1, 9), [9]):
                async with AsyncExitStack() as run:
                    publisher = await _node(run, VERIFIER)
                    await _link(publisher, subscriber)
                    await publisher[1].wait_for_subscription(
                        subscriber[0].get_id(), topic, timeout=10
                    )
                    out = RecordPublisher(publisher[0], None, publisher[1], VERIFIER)
                    await out.publish([record(sequence) for sequence in batch])
                    while len(received) < batch[-1]:
                        await trio.sleep(0.05)
                # In-process, py-libp2p leaves the old connection open on the subscriber's
                # side; a killed process would drop it. Drop it, as the kernel would.
                await subscriber[0].disconnect(VERIFIER.peer_id)
                while VERIFIER.peer_id in subscriber[1].peers:
                    await trio.sleep(0.05)
    assert [r.record.sequence for r in received] == list(range(1, 10))
