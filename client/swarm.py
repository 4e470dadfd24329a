"""The client's view of the swarm: discovery, health, bans with backoff, routes."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from trustswarm.protocol.announcement import (
    Announcement,
    AnnouncementValidator,
    SignedAnnouncement,
)
from trustswarm.protocol.errors import SwarmError
from trustswarm.protocol.evidence import DisagreementReport, Evidence, SignedExchange
from trustswarm.protocol.identity import parse_peer_id
from trustswarm.protocol.info import ServerInfo, call_info
from trustswarm.protocol.protocols import DHT_NAMESPACE
from trustswarm.protocol.statement import DTYPES
from trustswarm.protocol.transport import connect_peers, parse_peer_addr, running_host
from trustswarm.reputation.gossip import record_relay
from trustswarm.reputation.records import REPUTATION_NAMESPACE, ReputationValidator
from trustswarm.reputation.score import OK

from .audits import Auditor
from .discovery import DiscoveryBounds, DiscoveryStats
from .refresh import parse_addrs, refresh_all, refresh_by_discovery
from .replicas import segments
from .reports import send_report
from .routing import Hop, latency_route, throughput_route
from .rpc import StreamPool
from .trust import TrustFeed, TrustView

log = logging.getLogger("trustswarm.client")
T = TypeVar("T")
# "any": every server whatever dtype it announces; "float32": only float32 servers, so
# every answer is float32 and compared with the float32 tolerance.
DTYPE_POLICIES = ("any", "float32")


def check_dtype_policy(policy: str) -> str:
    if policy not in DTYPE_POLICIES:
        raise ValueError(f"dtype_policy must be one of {DTYPE_POLICIES}, got {policy!r}")
    return policy


@dataclass
class Ban:
    failures: int
    until: float
    reason: str


@dataclass
class SwarmView:
    """Servers we know for one model, with measured RTTs and the bans we hold."""

    model_id: str
    # From our manifest; announcements must match. None: no manifest, any weights digest
    # is accepted (a monitor's view, e.g. the health page; never route with it).
    span_digest: Callable[[int, int], str] | None
    request_timeout: float = 30.0
    ban_base: float = 15.0
    ban_max: float = 600.0
    servers: dict[str, Announcement] = field(default_factory=dict)
    rtts: dict[str, float] = field(default_factory=dict)
    observed: dict[str, str] = field(default_factory=dict)  # peer id -> remote IP we saw
    sessions: dict[str, int] = field(default_factory=dict)  # active, per its last info
    bans: dict[str, Ban] = field(default_factory=dict)
    banned_for_session: set[str] = field(default_factory=set)
    # Reputation from trusted verifiers (None: no verifiers configured, no filtering).
    trust: TrustView | None = None
    # Disagreements seen by redundant calls, oldest first, with their evidence.
    trust_events: list[DisagreementReport] = field(default_factory=list)
    on_disagreement: Callable[[DisagreementReport], None] | None = None
    outbox: list[DisagreementReport] = field(default_factory=list)  # for the verifiers
    dtype_policy: str = "any"  # see DTYPE_POLICIES

    def __post_init__(self) -> None:
        check_dtype_policy(self.dtype_policy)

    def report_disagreement(self, report: DisagreementReport) -> None:
        """Ban the servers whose answers lost for the rest of this client's routing."""
        self.trust_events.append(report)
        self.outbox.append(report)
        for peer in report.minority:
            self.banned_for_session.add(peer)
            log.warning(
                "server %s disagreed with the majority on blocks %d:%d; not using it again",
                peer,
                report.start,
                report.end,
            )
        if self.on_disagreement is not None:
            try:
                self.on_disagreement(report)
            except Exception:
                log.exception("on_disagreement callback failed")

    def consider(self, signed: SignedAnnouncement) -> bool:
        """Accept a verified, unexpired announcement for our model with the right weights."""
        ann = self.acceptable(signed)
        if ann is None:
            return False
        current = self.servers.get(ann.peer_id)
        if current is None or current.issued_at <= ann.issued_at:
            self.servers[ann.peer_id] = ann
        return True

    def acceptable(self, signed: SignedAnnouncement) -> Announcement | None:
        """The announcement when it is verified, unexpired, for our model with the right
        weights and a dtype that can sign answers; None otherwise."""
        try:
            signed.verify()
        except Exception:
            return None
        ann = signed.announcement
        if ann.model_id != self.model_id:
            return None
        if self.span_digest is not None:
            try:  # a span outside our model (e.g. 0:40 of 30 blocks) is simply not ours
                digest = self.span_digest(ann.start, ann.end)
            except Exception:
                return None
            if ann.weights_digest != digest:
                return None
        if ann.dtype not in DTYPES:  # it could not sign a valid answer
            return None
        return ann

    def expected_digest(self, start: int, end: int) -> str:
        """The weights digest answers for blocks [start, end) must carry (our manifest's)."""
        if self.span_digest is None:
            raise SwarmError("this swarm view has no manifest: it cannot check answers")
        return self.span_digest(start, end)

    def ban(self, peer_id: str, reason: str) -> None:
        previous = self.bans.get(peer_id)
        failures = previous.failures + 1 if previous else 1
        seconds = min(self.ban_max, self.ban_base * 2 ** (failures - 1))
        self.bans[peer_id] = Ban(failures, time.monotonic() + seconds, reason)
        log.warning("banning %s for %.0f s: %s", peer_id, seconds, reason)

    def usable(self, exclude: Sequence[str] = ()) -> list[Announcement]:
        now, wall = time.monotonic(), time.time()
        return [
            ann
            for peer, ann in self.servers.items()
            if not ann.expired(wall)
            and peer not in exclude
            and peer not in self.banned_for_session
            and (peer not in self.bans or self.bans[peer].until <= now)
            and (self.trust is None or self.trust.allowed(peer, wall))
            and self.dtype_allowed(ann)
        ]

    def dtype_allowed(self, ann: Announcement) -> bool:
        return self.dtype_policy == "any" or ann.dtype == self.dtype_policy

    def _explained(self, route: Callable[[], T], start: int, end: int) -> T:
        """Run `route`; when it finds no servers and the dtype policy left some out, say so."""
        try:
            return route()
        except SwarmError as exc:
            wall = time.time()
            left_out = [
                ann
                for ann in self.servers.values()
                if not self.dtype_allowed(ann)
                and not ann.expired(wall)
                and ann.start < end
                and start < ann.end
            ]
            if not left_out:
                raise
            dtypes = ", ".join(sorted({ann.dtype for ann in left_out}))
            raise SwarmError(
                f"{exc} (dtype_policy={self.dtype_policy!r} leaves out {len(left_out)} "
                f"server(s) for these blocks that announce {dtypes})"
            ) from None

    def segments(self, start: int, end: int, k: int) -> list[tuple[int, int]]:
        """Blocks [start, end) cut for redundancy k over the usable servers."""
        return self._explained(lambda: segments(self.usable(), start, end, k), start, end)

    def established(self, servers: list[Announcement]) -> list[Announcement]:
        """The servers trusted verifiers call ok (all of them without trusted verifiers)."""
        if self.trust is None:
            return servers
        wall = time.time()
        return [s for s in servers if self.trust.state(s.peer_id, wall) == OK]

    def _tiered(
        self, servers: list[Announcement], route: Callable[[list[Announcement]], list[Hop]]
    ) -> list[Hop]:
        # Established servers first, strictly: a penalty alone loses to a Sybil that
        # boasts its speed (measured in bench/results/adversary.md). Servers on
        # probation carry traffic only where established ones cannot.
        established = self.established(servers)
        if len(established) < len(servers):
            try:
                return route(established)
            except SwarmError:
                pass
        return route(servers)

    def inference_route(self, start: int, end: int, exclude: Sequence[str] = ()) -> list[Hop]:
        def route(servers: list[Announcement]) -> list[Hop]:
            penalties = self._trust_map(servers, "penalty")
            return latency_route(servers, start, end, self.rtts, penalties)

        return self._explained(lambda: self._tiered(self.usable(exclude), route), start, end)

    def forward_route(self, start: int, end: int, rng: random.Random | None = None) -> list[Hop]:
        def route(servers: list[Announcement]) -> list[Hop]:
            return throughput_route(servers, start, end, rng, self._trust_map(servers, "weight"))

        return self._explained(lambda: self._tiered(self.usable(), route), start, end)

    def _trust_map(self, servers: list[Announcement], kind: str) -> dict[str, float] | None:
        """Per-server route penalties or weights from reputation (None without trust)."""
        if self.trust is None:
            return None
        wall = time.time()
        fn = self.trust.route_penalty if kind == "penalty" else self.trust.route_weight
        return {ann.peer_id: fn(ann.peer_id, wall) for ann in servers}


class SwarmClient:
    """Network side of a client: a libp2p host, a DHT client, and a SwarmView."""

    def __init__(
        self,
        host: IHost,
        view: SwarmView,
        initial_peers: Sequence[str],
        connect_timeout: float = 10.0,
        refresh_every: float = 30.0,
        report_to: Sequence[str] = (),
        auditor: Auditor | None = None,
        discovery: DiscoveryBounds | None = None,
    ) -> None:
        self.host = host
        self.view = view
        self.initial_addrs = list(initial_peers)
        self.initial_peers = [parse_peer_addr(a) for a in initial_peers]
        self.connect_timeout = connect_timeout
        self.refresh_every = refresh_every
        self.dht: KadDHT | None = None
        self.streams = StreamPool()  # idle forward/backward streams, reused
        # Verifiers (peer ids or multiaddrs) that get every disagreement report.
        self.report_to = list(report_to)
        # Draws which finished exchanges go to the verifiers as audits (None: no audits).
        self.auditor = auditor
        self.dht_lookups = True
        # Bounded discovery (client/refresh.py): ask a few peers for pages of the
        # announcements covering our blocks, contact only enough servers per block.
        # None: ask every known server and the DHT (a verifier or monitor sees all).
        self.discovery = discovery
        self.no_discover: set[str] = set()  # peers that refused the discover RPC
        self.last_discovery: DiscoveryStats | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the swarm, learn its servers, then refresh periodically until cancelled."""
        from libp2p.tools.anyio_service import background_trio_service

        async with running_host(self.host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            self.dht = KadDHT(self.host, DHTMode.CLIENT)
            self.dht.register_validator(DHT_NAMESPACE, AnnouncementValidator())
            self.dht.register_validator(REPUTATION_NAMESPACE, ReputationValidator())
            # With trusted verifiers: follow their records on gossipsub (before dialling).
            trust = self.view.trust
            feed = (
                record_relay(self.host, self.view.model_id, trust.accept)
                if trust is not None
                else contextlib.nullcontext()
            )
            async with background_trio_service(self.dht), feed:
                await connect_peers(
                    self.host,
                    self.dht,
                    self.initial_addrs,
                    self.connect_timeout,
                )
                await self.refresh()
                if not self.view.servers:
                    raise SwarmError("the initial peers know no servers for this model")
                task_status.started()
                async with trio.open_nursery() as nursery:
                    if self.report_to:
                        nursery.start_soon(self._send_reports)
                    if self.auditor is not None:
                        nursery.start_soon(self.auditor.run, self.host)
                    while True:
                        await trio.sleep(self.refresh_every)
                        try:
                            await self.refresh()
                        except Exception as exc:  # keep the old view; try again later
                            log.warning("refreshing the swarm view failed: %s", exc)

    def audit(self, exchanges: Sequence[SignedExchange]) -> bool:
        """An exchange with one server has ended (one answer, or one hop's session
        transcript): offer it for an audit. Never waits; a no-op without an auditor.
        True when it was drawn for an audit (queued for the verifiers)."""
        if self.auditor is not None and exchanges:
            return self.auditor.offer(Evidence(tuple(exchanges)))
        return False

    async def _send_reports(self, every: float = 0.5) -> None:
        """Send each disagreement report to every verifier we report to (best effort:
        a verifier that is down misses it; the evidence stays in `trust_events`)."""
        while True:
            await trio.sleep(every)
            while self.view.outbox:
                report = self.view.outbox.pop(0)
                for verifier in self.report_to:
                    try:
                        verdict = await send_report(self.host, verifier, report)
                        log.info("verifier %s: %s", verifier[-12:], verdict)
                    except Exception as exc:
                        log.warning("could not report to verifier %s: %s", verifier[-12:], exc)

    async def refresh(self) -> None:
        """Learn which servers exist and measure their RTTs: by bounded discovery when it
        is on and some peer speaks it, else by asking every known peer and the DHT."""
        stats = None
        if self.discovery is not None:
            stats = await refresh_by_discovery(self, self.discovery)
            self.last_discovery = stats
        if stats is None:
            await refresh_all(self)
        if self.view.trust is not None and self.dht is not None:
            # Records missed on gossip (joined late, dropped bursts) are in the DHT.
            with trio.move_on_after(self.connect_timeout):
                await TrustFeed(self.view.trust, self.dht).fetch(
                    list(self.view.servers), self.view.model_id
                )

    async def contact(self, peer: str, addrs: list[multiaddr.Multiaddr]) -> ServerInfo | None:
        """Dial `peer` and ask for its info; record its RTT, sessions, the address we
        reached and its own announcement. None when it did not answer (or is us)."""
        try:
            peer_id = parse_peer_id(peer)
            if peer_id == self.host.get_id():
                return None
            with trio.fail_after(self.connect_timeout):
                await self.host.connect(PeerInfo(peer_id, [_strip_p2p(a) for a in addrs]))
            info = await call_info(self.host, peer_id, self.connect_timeout)
        except Exception as exc:
            log.debug("server %s did not answer info: %s", peer, exc)
            return None
        self.view.rtts[peer] = info.rtt
        self.view.sessions[peer] = info.active_sessions
        seen = remote_ip(self.host, peer_id)
        if seen:
            self.view.observed[peer] = seen
        # A peer's own announcement, not one it replays for another server.
        if info.announcement.announcement.peer_id == peer:
            self.view.consider(info.announcement)
        return info

    async def ensure_connected(self, peer_id: ID) -> None:
        ann = self.view.servers.get(str(peer_id))
        if ann is None:
            return
        with trio.fail_after(self.connect_timeout):
            await self.host.connect(
                PeerInfo(peer_id, [_strip_p2p(a) for a in parse_addrs(ann.addrs)])
            )


def remote_ip(host: IHost, peer_id: ID) -> str | None:
    """The IP address our connection to `peer_id` actually goes to (None if unknown)."""
    try:
        conn = host.get_network().get_connection(peer_id)
        address = conn.muxed_conn.get_remote_address() if conn is not None else None
    except Exception:
        return None
    return str(address[0]) if address else None


def _strip_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    text = str(addr)
    return multiaddr.Multiaddr(text.split("/p2p/")[0]) if "/p2p/" in text else addr
