"""The verifier daemon: spot-checks, fraud reports, and signed reputation records.

One libp2p host under the verifier's published identity joins the swarm's DHT (server
mode, with the announcement and reputation validators) and gossipsub, learns the
servers through its checker clients (a few long-lived client identities, checkers.py;
its own identity only keeps a connection to each server for the DHT and gossip, and
makes no RPCs), serves `/trustswarm/report/1`, and runs
three loops: spot-checks at random times (made as a client by a checker, see
spotcheck.py), publishing a new signed record for a server right after each check or
ban, and re-publishing every server's record periodically (records expire; the
publisher paces its sends because gossipsub drops bursts).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import multiaddr
import torch
import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from trustswarm.client.swarm import SwarmView
from trustswarm.client.trust import TrustView
from trustswarm.models.compute import run_limited
from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ModelDir
from trustswarm.protocol import protocols
from trustswarm.protocol.announcement import Announcement, AnnouncementValidator
from trustswarm.protocol.errors import ProtocolError
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.protocols import DHT_NAMESPACE
from trustswarm.protocol.transport import (
    connect_peers,
    make_host,
    parse_multiaddr,
    running_host,
)
from trustswarm.reputation.gossip import follow_records, running_pubsub
from trustswarm.reputation.publish import RecordPublisher
from trustswarm.reputation.records import (
    REPUTATION_NAMESPACE,
    ReputationRecord,
    ReputationValidator,
    SignedReputationRecord,
    short_reason,
    sign_record,
)
from trustswarm.reputation.score import BANNED
from trustswarm.reputation.store import ReputationStore

from .audits import AuditDesk
from .challenges import ChallengeFactory
from .checkers import CheckerPool
from .conditioning import NaturalConditioning
from .config import VerifierConfig
from .judge import Judge
from .reports import ReportDesk
from .spotcheck import FAIL, FRAUD, PASS, CheckResult, SpotChecker

REPUBLISH_BATCH = 32  # records per publish batch when re-publishing
log = logging.getLogger("trustswarm.verifier")


@dataclass
class Verifier:
    identity: Identity
    model_dir: ModelDir
    store: ReputationStore
    config: VerifierConfig = field(default_factory=VerifierConfig)
    swarm_key: str | None = None
    rng: random.Random = field(default_factory=random.Random)
    host: IHost | None = None
    dht: KadDHT | None = None
    pubsub: Pubsub | None = None
    view: SwarmView | None = None
    checker: SpotChecker | None = None
    desk: ReportDesk | None = None
    audits: AuditDesk | None = None
    results: deque[CheckResult] = field(default_factory=lambda: deque(maxlen=1000))
    published: int = 0  # records handed to the publisher since start

    def __post_init__(self) -> None:
        self._compute = trio.CapacityLimiter(1)
        self._publish_lock = trio.Lock()
        self._publish_send, self._publish_receive = trio.open_memory_channel[str](256)

    @property
    def peer_id(self) -> str:
        return str(self.identity.peer_id)

    @property
    def model_id(self) -> str:
        return self.model_dir.manifest.model_id

    async def compute(self, fn, *args):  # noqa: ANN001, ANN201 - torch work off the loop
        return await run_limited(self._compute, fn, *args)

    # -- records --------------------------------------------------------------------

    def record_for(self, peer_id: str) -> SignedReputationRecord | None:
        rep = self.store.get(peer_id, self.model_id)
        if rep is None:
            return None
        if self.checker is not None:  # refused checks cost confidence (score.py)
            rep = self.checker.standing(rep)
        ann = self.view.servers.get(peer_id) if self.view else None
        if ann is not None:
            start, end = ann.start, ann.end
        elif rep.start is not None and rep.end is not None:
            start, end = rep.start, rep.end
        else:
            start, end = 0, self.model_dir.num_blocks
        now = time.time()
        record = ReputationRecord(
            verifier_id=self.peer_id,
            subject=peer_id,
            model_id=self.model_id,
            start=start,
            end=end,
            score=float(rep.score),
            state=rep.state,
            passes=rep.passes,
            failures=rep.failures,
            issued_at=now,
            expires_at=now + self.config.record_ttl,
            sequence=self.store.next_sequence(),
            # When we last looked, and why we banned (the health page shows them). A
            # shared database's other processes may run a little ahead of our clock.
            last_check_at=_not_after(rep.last_spot_check, now),
            last_audit_at=_not_after(rep.last_audit, now),
            ban_reason=short_reason(rep.ban_reason) if rep.state == BANNED else None,
        )
        try:
            return sign_record(self.identity, record)
        except ProtocolError:  # too long with the reason (a huge model id): go without
            return sign_record(self.identity, dataclasses.replace(record, ban_reason=None))

    async def _publish(self, publisher: RecordPublisher, peers: Sequence[str]) -> None:
        # One batch at a time: records go out in the order of their sequence numbers
        # (a DHT node refuses to replace a record with an older one).
        async with self._publish_lock:
            records = [r for r in (self.record_for(p) for p in peers) if r is not None]
            if not records:
                return
            try:  # also saves each record in the store
                await publisher.publish(records)
            except Exception as exc:  # the DHT and gossip are best effort; we publish again
                log.warning("publishing %d record(s) failed: %s", len(records), exc)
            self.published += len(records)

    async def _publish_changes(self, publisher: RecordPublisher) -> None:
        """Publish a fresh record for each server whose evidence just changed."""
        async for peer in self._publish_receive:
            pending = {peer}
            while True:  # coalesce a burst of changes
                try:
                    pending.add(self._publish_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._publish(publisher, sorted(pending))

    def live_peers(self, now: float | None = None) -> list[str]:
        """The servers whose records are worth re-publishing, most recently seen first:
        checked within `republish_horizon`, or banned within `ban_horizon`. Rows of
        servers long gone stay in the store but cost nothing per round."""
        now = time.time() if now is None else now
        cfg = self.config
        live = [
            r
            for r in self.store.all(self.model_id, now)
            if (r.last_checked or 0.0) >= now - cfg.republish_horizon
            or (r.state == BANNED and (r.banned_at or 0.0) >= now - cfg.ban_horizon)
        ]
        live.sort(key=lambda r: -max(r.last_checked or 0.0, r.banned_at or 0.0))
        return [r.peer_id for r in live]

    async def _republish_forever(self, publisher: RecordPublisher) -> None:
        while True:
            began = trio.current_time()
            peers = self.live_peers()
            for i in range(0, len(peers), REPUBLISH_BATCH):
                # The lock is taken per batch: a ban published on a change never waits
                # for a whole round of re-publishing.
                await self._publish(publisher, peers[i : i + REPUBLISH_BATCH])
            elapsed = trio.current_time() - began
            await trio.sleep(max(1.0, self.config.republish_every - elapsed))

    def changed(self, peer_id: str) -> None:
        try:
            self._publish_send.send_nowait(peer_id)
        except trio.WouldBlock:  # the periodic re-publish will carry it
            pass

    async def _on_check(self, result: CheckResult) -> None:
        self.results.append(result)
        if result.outcome in (PASS, FAIL, FRAUD):  # compared: not refused nor skipped
            await trio.to_thread.run_sync(self.store.note_spot_check, result.peer_id, self.model_id)
        if result.outcome != "skipped":
            self.changed(result.peer_id)
        if result.outcome == FRAUD:
            log.warning("banned %s: %s", result.peer_id, result.detail)

    async def _on_ban(self, peer_id: str) -> None:
        self.changed(peer_id)

    async def _on_audit(self, peer_id: str) -> None:
        """A client's audit of `peer_id` was judged (passed, failed or proved fraud)."""
        await trio.to_thread.run_sync(self.store.note_audit, peer_id, self.model_id)
        self.changed(peer_id)

    async def _stay_connected(self) -> None:
        """Keep a connection to every server the checkers found, as servers keep one
        to each other: records reach them over it (gossip, DHT). No RPC goes over it;
        discovery and checks are the checker clients'."""

        async def connect(ann: Announcement) -> None:
            addrs = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in ann.addrs]
            with trio.move_on_after(self.config.connect_timeout):
                try:  # a no-op while connected
                    await self.host.connect(PeerInfo(ID.from_base58(ann.peer_id), addrs))
                except Exception as exc:
                    log.debug("cannot connect to %s: %s", ann.peer_id, exc)

        while True:
            async with trio.open_nursery() as nursery:
                for ann in list(self.view.servers.values()):
                    nursery.start_soon(connect, ann)
            await trio.sleep(self.config.refresh_every)

    # -- main -----------------------------------------------------------------------

    def _load(self) -> tuple[BlockRunner, ChallengeFactory, Judge]:
        runner = BlockRunner(self.model_dir, 0, self.model_dir.num_blocks, torch.float32)
        factory = ChallengeFactory(self.model_dir, runner, rng=random.Random(self.rng.random()))
        head = runner.model_dir.load_client_parts()
        conditioning = NaturalConditioning(factory)
        return runner, factory, Judge(runner, self.model_id, head=head, conditioning=conditioning)

    async def serve(
        self,
        listen: Sequence[str],
        initial_peers: Sequence[str] = (),
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled; reports the full multiaddrs through task_status."""
        cfg = self.config
        _, factory, judge = await trio.to_thread.run_sync(self._load)
        self.host = make_host(self.identity, self.swarm_key)
        async with running_host(self.host, [parse_multiaddr(a) for a in listen]):
            self.dht = KadDHT(self.host, DHTMode.SERVER)
            self.dht.register_validator(DHT_NAMESPACE, AnnouncementValidator())
            self.dht.register_validator(REPUTATION_NAMESPACE, ReputationValidator())
            # Pubsub runs before we dial anyone (see reputation/gossip.py).
            async with background_trio_service(self.dht), running_pubsub(self.host) as pubsub:
                self.pubsub = pubsub
                # Gossip message ids are (peer id, seqno) and py-libp2p starts seqno at
                # the time in seconds, +1 per message: a verifier restarted with the same
                # identity would reuse ids its peers have seen and its records would be
                # dropped as duplicates. Microseconds stay ahead of any earlier run.
                pubsub.counter = max(pubsub.counter, time.time_ns() // 1000)
                await connect_peers(self.host, self.dht, initial_peers, cfg.connect_timeout)
                self.view = SwarmView(
                    model_id=self.model_id,
                    span_digest=self.model_dir.manifest.span_digest,
                    request_timeout=cfg.checks.timeout,
                    # Checkers follow our records on gossip, as a client trusting us does.
                    trust=TrustView({self.peer_id}, model_id=self.model_id),
                )
                pool = CheckerPool(
                    self.view,
                    initial_peers,
                    self.swarm_key,
                    size=cfg.checks.checkers,
                    lifetime=cfg.checks.checker_lifetime,
                    refresh_every=cfg.refresh_every * cfg.checks.checkers,
                    connect_timeout=cfg.connect_timeout,
                    rng=random.Random(self.rng.random()),
                )
                self.checker = SpotChecker(
                    self.view,
                    factory,
                    judge,
                    self.store,
                    self.compute,
                    pool,
                    cfg.checks,
                    random.Random(self.rng.random()),
                )
                self.audits = AuditDesk(judge, self.store, self.compute, cfg.audits, self._on_audit)
                # Reports first: audits wait while a report waits for or holds compute.
                report_compute = self.audits.priority.wrap(self.compute)
                self.desk = ReportDesk(judge, self.store, report_compute, cfg.reports, self._on_ban)
                self.host.set_stream_handler(protocols.REPORT, self.desk.handle)
                self.host.set_stream_handler(protocols.AUDIT, self.audits.handle)
                publisher = RecordPublisher(
                    self.host,
                    self.dht,
                    self.pubsub,
                    self.identity,
                    self.store,
                    pace_seconds=cfg.publish_pace,
                )
                full = list(
                    dict.fromkeys(
                        f"{str(a).split('/p2p/')[0]}/p2p/{self.peer_id}"
                        for a in self.host.get_addrs()
                    )
                )
                async with trio.open_nursery() as nursery:
                    await nursery.start(follow_records, pubsub, self.model_id)  # relay only
                    await nursery.start(pool.run)  # discovery: the checkers' refreshes
                    nursery.start_soon(self._stay_connected)
                    nursery.start_soon(self._republish_forever, publisher)
                    nursery.start_soon(self._publish_changes, publisher)
                    nursery.start_soon(self.checker.run, self._on_check)
                    nursery.start_soon(self.audits.run)
                    task_status.started(full)
                    await trio.sleep_forever()


def _not_after(at: float | None, now: float) -> float | None:
    return None if at is None else min(at, now)
