"""A block server: a libp2p host serving a span of blocks, announced in the DHT."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ModelDir
from trustswarm.protocol import protocols
from trustswarm.protocol.announcement import (
    MAX_THROUGHPUT,
    Announcement,
    AnnouncementValidator,
    SignedAnnouncement,
    announcement_key,
    providers_key,
    sign_announcement,
)
from trustswarm.protocol.discovery import DISCOVER, DiscoveryPage, DiscoveryQuery
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.info import call_info
from trustswarm.protocol.protocols import DHT_NAMESPACE
from trustswarm.protocol.transport import (
    connect_peers,
    make_host,
    parse_multiaddr,
    parse_peer_addr,
    running_host,
)
from trustswarm.reputation.gossip import record_relay
from trustswarm.reputation.records import REPUTATION_NAMESPACE, ReputationValidator

from .config import ServerConfig
from .discovery import discovery_handler
from .forwarding import ChainedSteps, handle_chain
from .handlers import (
    Handler,
    ServingContext,
    guarded,
    handle_backward,
    handle_forward,
    handle_inference,
    handle_info,
)
from .peers import VerifiedRecords, answer_query, known_announcements, sample_to_fit
from .selection import coverage, worst_covered_span

log = logging.getLogger("trustswarm.node")


@dataclass
class BlockServer:
    identity: Identity
    model_dir: ModelDir
    config: ServerConfig
    span: tuple[int, int] | None = None  # None: choose the worst-covered span at start
    span_length: int | None = None  # blocks to serve when choosing; default all
    dtype: torch.dtype = torch.float32
    swarm_key: str | None = None
    # Addresses put in the announcement instead of the listen addresses (Petals'
    # --announce_maddrs): a NAT's forwarded port, a public IP, a relay. No /p2p/ part.
    announce_addrs: tuple[str, ...] = ()
    throughput: float = 0.0
    runner: BlockRunner | None = None
    host: IHost | None = None
    dht: KadDHT | None = None
    pubsub: Pubsub | None = None  # relays verifiers' reputation records
    announcement: SignedAnnouncement | None = None
    ctx: ServingContext | None = None
    verified: VerifiedRecords = field(default_factory=VerifiedRecords)  # info re-reads

    @property
    def model_id(self) -> str:
        return self.model_dir.manifest.model_id

    def _info(self) -> dict:
        known = known_announcements(self.dht, self.model_id, self.verified) if self.dht else []
        return {
            "announcement": self.announcement.to_bytes().decode() if self.announcement else "",
            "known": sample_to_fit(known),
            "active_sessions": self.ctx.active_sessions if self.ctx else 0,
            "max_sessions": self.config.max_sessions,
        }

    def _discover(self, query: DiscoveryQuery) -> DiscoveryPage:
        """A page of the announcements this node's store holds for `query`'s blocks."""
        known = known_announcements(self.dht, self.model_id, self.verified) if self.dht else []
        return answer_query(known, query)

    def _announce_record(self) -> SignedAnnouncement:
        now = time.time()
        if self.announce_addrs:
            addrs = tuple(self.announce_addrs)
        elif self.host:
            addrs = tuple(str(a).split("/p2p/")[0] for a in self.host.get_addrs())
        else:
            addrs = ()
        return sign_announcement(
            self.identity,
            Announcement(
                peer_id=str(self.identity.peer_id),
                model_id=self.model_id,
                start=self.runner.start,
                end=self.runner.end,
                weights_digest=self.runner.weights_digest,
                dtype=str(self.runner.dtype).removeprefix("torch."),
                throughput=min(float(self.throughput), MAX_THROUGHPUT),
                addrs=addrs,
                issued_at=now,
                expires_at=now + self.config.announce_ttl,
            ),
        )

    async def _announce_forever(self) -> None:
        while True:
            self.announcement = self._announce_record()
            key = announcement_key(self.model_id, str(self.identity.peer_id))
            try:
                with trio.move_on_after(10):
                    await self.dht.put_value(key, self.announcement.to_bytes())
                with trio.move_on_after(10):
                    await self.dht.provide(providers_key(self.model_id))
            except Exception as exc:  # the DHT is best effort; the info RPC still answers
                log.warning("DHT announcement failed: %s", exc)
            await trio.sleep(self.config.announce_every)

    async def _choose_span(self, initial_peers: Sequence[str]) -> tuple[int, int]:
        """Serve the window of blocks the swarm covers worst (Petals' rule)."""
        seen = {
            a.announcement.peer_id: a.announcement
            for a in known_announcements(self.dht, self.model_id)
        }
        for text in initial_peers:
            try:
                info = await call_info(self.host, parse_peer_addr(text).peer_id, 10.0)
            except Exception as exc:
                log.info("initial peer %s gave no info: %s", text, exc)
                continue
            for signed in [info.announcement, *info.known]:
                try:
                    signed.verify()
                except Exception:  # noqa: S112 - skip forged or stale records
                    continue
                if signed.announcement.model_id == self.model_id:
                    seen[signed.announcement.peer_id] = signed.announcement
        total = self.model_dir.num_blocks
        length = self.span_length or total
        return worst_covered_span(coverage(list(seen.values()), total), length)

    def _load_runner(self, span: tuple[int, int]) -> BlockRunner:
        return BlockRunner(self.model_dir, span[0], span[1], self.dtype)

    def _stream_handlers(self) -> list[tuple[TProtocol, str, Handler]]:
        """(protocol, name, handler) for every RPC this server answers."""
        return [
            (protocols.INFO, "info", handle_info),
            (DISCOVER, "discover", discovery_handler(self._discover)),
            (protocols.FORWARD, "forward", handle_forward),
            (protocols.BACKWARD, "backward", handle_backward),
            (protocols.INFERENCE, "inference", handle_inference),
            (protocols.CHAIN, "chain", handle_chain),
        ]

    def _make_context(self) -> ServingContext:
        return ServingContext(
            identity=self.identity,
            runner=self.runner,
            model_id=self.model_id,
            span_digest=self.model_dir.manifest.span_digest,
            config=self.config,
            info=self._info,
            chained=self._chained_steps(),
        )

    def _chained_steps(self) -> ChainedSteps:
        """Chained inference steps through this server (node/forwarding.py)."""
        return ChainedSteps(self.host)

    async def serve(
        self,
        listen: Sequence[str],
        initial_peers: Sequence[str] = (),
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled. Reports the full multiaddrs through task_status."""
        self.host = make_host(self.identity, self.swarm_key, self.announce_addrs)
        addrs = [parse_multiaddr(a) for a in listen]
        async with running_host(self.host, addrs):
            self.dht = KadDHT(self.host, DHTMode.SERVER)
            self.dht.register_validator(DHT_NAMESPACE, AnnouncementValidator())
            self.dht.register_validator(REPUTATION_NAMESPACE, ReputationValidator())
            # Pubsub relays verifiers' reputation records; it must run before dialling.
            async with (
                background_trio_service(self.dht),
                record_relay(self.host, self.model_id) as self.pubsub,
            ):
                await connect_peers(self.host, self.dht, initial_peers)
                span = self.span or await self._choose_span(initial_peers)
                self.runner = await trio.to_thread.run_sync(self._load_runner, span)
                self.throughput = await trio.to_thread.run_sync(measure_throughput, self.runner)
                self.ctx = self._make_context()
                for protocol_id, name, body in self._stream_handlers():
                    self.host.set_stream_handler(protocol_id, guarded(self.ctx, name, body))
                peer = str(self.identity.peer_id)
                full = list(
                    dict.fromkeys(
                        f"{str(a).split('/p2p/')[0]}/p2p/{peer}"
                        for a in self.host.get_transport_addrs()  # listen, not announce
                    )
                )
                async with trio.open_nursery() as nursery:
                    self.announcement = self._announce_record()
                    nursery.start_soon(self._announce_forever)
                    task_status.started(full)
                    await trio.sleep_forever()


def measure_throughput(runner: BlockRunner, tokens: int = 16, repeats: int = 3) -> float:
    """Tokens per second through the whole span, measured once at start."""
    hidden = torch.randn(1, tokens, runner.hidden_size)
    runner.forward(hidden)  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        runner.forward(hidden)
    return tokens * repeats / max(time.perf_counter() - began, 1e-6)
