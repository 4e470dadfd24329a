"""Gossipsub for reputation records: running pubsub on a host, checking and following
the record topic.

py-libp2p 0.8.1 facts this relies on (see shared/LIBP2P_NOTES.md):

* `Pubsub(host, GossipSub(...))` registers a connection notifee whose `connected`
  callback blocks until the pubsub service takes the peer: create and run pubsub
  *before* dialling anyone (`running_pubsub` does both at once).
* The default gossipsub heartbeat is 120 s; we use 1 s so meshes form quickly.
* Topic validators run on every message, also on our own publishes, before it is
  delivered or forwarded: `RecordFilter` drops malformed, forged, expired,
  other-model and replayed (older sequence than already seen) records there, so a
  node never relays them.
* Message ids are (origin, seqno), seqnos counted from the start time in seconds:
  `running_pubsub` counts from microseconds so a restarted node's ids are new.
* Subscription queues hold 32 messages and drop the rest: `follow_records` drains
  the queue in its own task.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from .records import REPUTATION_TOPIC, SignedReputationRecord

log = logging.getLogger("trustswarm.reputation")
HEARTBEAT_SECONDS = 1


def make_gossipsub() -> GossipSub:
    return GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=HEARTBEAT_SECONDS,
    )


@asynccontextmanager
async def running_pubsub(host: IHost) -> AsyncIterator[Pubsub]:
    """Run gossipsub on a (running) host for the duration of the block.

    Enter it before connecting to peers: connections made earlier are not known
    to pubsub, and py-libp2p's notifee blocks connects while pubsub is not running.
    """
    router = make_gossipsub()
    pubsub = Pubsub(host, router, strict_signing=True)
    # Message ids are (origin, seqno) and seqnos start at int(time.time()): a node
    # restarted within the relays' seen-cache window (120 s) would reuse ids of its
    # earlier messages and have its fresh publishes dropped as duplicates.
    pubsub.counter = max(pubsub.counter, time.time_ns() // 1000)
    async with background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        yield pubsub


class RecordFilter:
    """Gossipsub topic validator for one model's record topic (also usable directly).

    Accepts a message only if it holds a well-formed record for this model, signed by
    the verifier it names, unexpired, and not older (by sequence) than a record
    already accepted for the same (verifier, subject). Remembers up to `max_keys`
    keys (least recently used forgotten first).
    """

    def __init__(self, model_id: str, max_keys: int = 10_000) -> None:
        self.model_id = model_id
        self.max_keys = max_keys
        self._seen: OrderedDict[str, int] = OrderedDict()
        self.accepted = 0
        self.rejected = 0

    def check(self, data: bytes, now: float | None = None) -> SignedReputationRecord | None:
        try:
            signed = SignedReputationRecord.from_bytes(bytes(data))
            signed.verify(now)
        except Exception as exc:
            self.rejected += 1
            log.debug("dropping reputation gossip: %s", exc)
            return None
        rec = signed.record
        if rec.model_id != self.model_id:
            self.rejected += 1
            return None
        key = rec.key
        seen = self._seen.get(key)
        if seen is not None and rec.sequence < seen:
            self.rejected += 1
            return None
        self._seen[key] = rec.sequence
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        self.accepted += 1
        return signed

    def __call__(self, _forwarder: ID, msg: object) -> bool:
        return self.check(getattr(msg, "data", b"")) is not None


async def follow_records(
    pubsub: Pubsub,
    model_id: str,
    on_record: Callable[[SignedReputationRecord], object] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Subscribe to the model's record topic (with a RecordFilter as its validator) and
    hand each accepted record to `on_record` until cancelled. With no `on_record` the
    node only relays (a server helps records cross the swarm)."""
    topic = REPUTATION_TOPIC(model_id)
    records = RecordFilter(model_id)
    pubsub.set_topic_validator(topic, records, is_async_validator=False)
    subscription = await pubsub.subscribe(topic)
    task_status.started()
    while True:
        msg = await subscription.get()
        if on_record is None:
            continue
        try:  # the validator already checked it; parse again for the object
            signed = SignedReputationRecord.from_bytes(msg.data)
        except Exception:  # noqa: S112 - cannot happen after the validator; be safe
            continue
        try:
            on_record(signed)
        except Exception as exc:  # a bad consumer must not stop the subscription
            log.warning("reputation record handler failed: %s", exc)


@asynccontextmanager
async def record_relay(
    host: IHost,
    model_id: str,
    on_record: Callable[[SignedReputationRecord], object] | None = None,
) -> AsyncIterator[Pubsub]:
    """Run pubsub on `host` and follow the model's record topic while the block runs.

    Servers use it with no `on_record`: they check and relay records, so a client
    connected to any server hears every verifier. Enter it before dialling peers.
    """
    async with running_pubsub(host) as pubsub, trio.open_nursery() as nursery:
        await nursery.start(follow_records, pubsub, model_id, on_record)
        try:
            yield pubsub
        finally:
            nursery.cancel_scope.cancel()
