"""Testing only: cheaters that recognise verifier checks by one cheap signal (issue 11).

Each is a real block server (a BlockServer subclass: start it in code, e.g.
`LocalSwarm.start_server(span, server_cls=stream_reuse_cheater())`; no flag of
`node start` can turn it on) that answers honestly unless its signal fires for the
request it is computing, and then signs a skipped-block answer: its last block skipped,
computed with a second copy of its blocks tampered by testing/adversary.py's
`skip_block` (the KV cache stays the honest one: skipping a block's output changes none
of the keys and values, so a session goes on as if nothing happened). The signals, as
measured against spot-checks made from a fresh identity per check:

* `stream_reuse_cheater`: the peer has opened more than one work stream (forward,
  backward or inference) to this server;
* `gossip_cheater`: the peer is subscribed to the model's reputation gossip topic;
* `connection_age_cheater`: the peer's connection is older than `threshold` seconds;
* `late_step_cheater`: the inference step number is >= `first_step` (0 is the prefill);
* `rare_cheater`: a random `fraction` (2 %) of answers, whoever asks;
* `targeting_cheater`: only for given peer ids (a victim): no check can ever see it.

Skipping the last block is honest when a request's span stops before that block (a
sub-span); the count `tampered` is of answers computed with the tampered copy.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from multiaddr import Multiaddr

from trustswarm.models.runner import BlockRunner
from trustswarm.node.handlers import Handler, ServingContext
from trustswarm.node.server import BlockServer
from trustswarm.reputation.records import REPUTATION_TOPIC

from .adversary import Tamper, derived_context, tamper_weights

log = logging.getLogger("trustswarm.adversary")
_ASKER: ContextVar[str] = ContextVar("trustswarm_asker", default="")  # the stream's peer
_KINDS = {"forward": "forward", "backward": "backward", "step": "inference"}


@dataclass(frozen=True)
class Asker:
    """What the server knows when it computes an answer."""

    peer: str
    kind: str  # "forward" | "backward" | "inference"
    step: int  # the inference step (0: the prefill); 0 for forward and backward
    work_streams: int  # forward/backward/inference streams this peer opened so far
    connection_age: float  # seconds since the peer's connection opened
    subscribed: bool  # the peer is subscribed to the reputation gossip topic


Signal = Callable[[Asker], bool]


class ConnectionClock(INotifee):
    """When each peer's (first still open) connection was established."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}
        self.open: Counter[str] = Counter()

    def age(self, peer: str) -> float:
        # Connections from before the clock started count from the first request.
        return time.monotonic() - self.since.setdefault(peer, time.monotonic())

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = str(conn.muxed_conn.peer_id)
        self.open[peer] += 1
        self.since.setdefault(peer, time.monotonic())

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = str(conn.muxed_conn.peer_id)
        self.open[peer] -= 1
        if self.open[peer] <= 0:
            del self.open[peer]
            self.since.pop(peer, None)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


@dataclass
class RecognisingContext(ServingContext):
    signal: Signal = field(default=lambda asker: False)
    skipping: BlockRunner | None = None  # the same blocks, the last one skipped
    clock: ConnectionClock = field(default_factory=ConnectionClock)
    subscribed: Callable[[str], bool] = field(default=lambda peer: False)
    work_streams: Counter[str] = field(default_factory=Counter)
    steps: WeakKeyDictionary = field(default_factory=WeakKeyDictionary)  # cache -> next step
    tampered: int = 0
    fired_for: Counter[str] = field(default_factory=Counter)  # peer -> tampered answers

    def asker(self, kind: str, step: int) -> Asker:
        peer = _ASKER.get()
        return Asker(
            peer=peer,
            kind=kind,
            step=step,
            work_streams=self.work_streams[peer],
            connection_age=self.clock.age(peer),
            subscribed=self.subscribed(peer),
        )

    async def run(self, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        name = getattr(fn, "__name__", "")
        kind = _KINDS.get(name)
        if kind is None or self.skipping is None:
            return await super().run(fn, *args)
        step = 0
        if kind == "inference":
            cache = args[0]
            step = self.steps.get(cache, 0)
            self.steps[cache] = step + 1
        asker = self.asker(kind, step)
        if self.signal(asker):
            fn = getattr(self.skipping, name)
            self.tampered += 1
            self.fired_for[asker.peer] += 1
            log.warning(
                "tampered answer #%d: skipped a block for %s (%s step %d)",
                self.tampered, asker.peer[-8:], kind, step,
            )  # fmt: skip
        return await super().run(fn, *args)


def _counting(name: str, body: Handler) -> Handler:
    async def handler(ctx: ServingContext, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        _ASKER.set(peer)  # this stream's task only
        if name != "info" and isinstance(ctx, RecognisingContext):
            ctx.work_streams[peer] += 1
        await body(ctx, stream)

    return handler


def recognising_server_cls(signal: Signal, name: str, boast: float = 1.0) -> type[BlockServer]:
    """A BlockServer that signs a skipped-block answer whenever `signal` fires; it
    announces `boast` times its measured throughput, to attract routes."""

    class RecognisingServer(BlockServer):
        def _load_runner(self, span: tuple[int, int]) -> BlockRunner:
            self.skipping = super()._load_runner(span)
            tamper_weights(self.skipping, Tamper("skip_block"))
            return super()._load_runner(span)

        def _stream_handlers(self) -> list:
            return [(p, n, _counting(n, body)) for p, n, body in super()._stream_handlers()]

        def _make_context(self) -> ServingContext:
            self.throughput *= boast
            clock = ConnectionClock()
            self.host.get_network().register_notifee(clock)
            topic, pubsub = REPUTATION_TOPIC(self.model_id), self.pubsub

            def subscribed(peer: str) -> bool:
                peers = pubsub.peer_topics.get(topic, set()) if pubsub is not None else ()
                return any(str(p) == peer for p in peers)

            return derived_context(
                super()._make_context(),
                RecognisingContext,
                signal=signal,
                skipping=self.skipping,
                clock=clock,
                subscribed=subscribed,
            )

        @property
        def tampered(self) -> int:
            return self.ctx.tampered if isinstance(self.ctx, RecognisingContext) else 0

    RecognisingServer.__name__ = f"RecognisingServer[{name}]"
    return RecognisingServer


def stream_reuse_cheater() -> type[BlockServer]:
    return recognising_server_cls(lambda a: a.work_streams > 1, "stream_reuse")


def gossip_cheater() -> type[BlockServer]:
    return recognising_server_cls(lambda a: a.subscribed, "gossip")


def connection_age_cheater(threshold: float = 20.0) -> type[BlockServer]:
    return recognising_server_cls(lambda a: a.connection_age > threshold, "connection_age")


def late_step_cheater(first_step: int = 7) -> type[BlockServer]:
    return recognising_server_cls(
        lambda a: a.kind == "inference" and a.step >= first_step, "late_step"
    )


def rare_cheater(fraction: float = 0.02, seed: int = 0) -> type[BlockServer]:
    rng = random.Random(seed)
    return recognising_server_cls(lambda a: rng.random() < fraction, "rare")


def targeting_cheater(victims: Iterable[str], boast: float = 1.0) -> type[BlockServer]:
    """Cheats only for the peer ids in `victims` (one user it wants to mislead): no check,
    which always comes from another identity, can ever see it cheat; only the victims'
    own audits can."""
    targets = frozenset(victims)
    return recognising_server_cls(lambda a: a.peer in targets, "targeting", boast=boast)


RECOGNISING: dict[str, Callable[[], type[BlockServer]]] = {
    "stream_reuse": stream_reuse_cheater,
    "gossip": gossip_cheater,
    "connection_age": connection_age_cheater,
    "late_step": late_step_cheater,
    "rare": rare_cheater,
}
__all__ = [
    "RECOGNISING",
    "Asker",
    "ConnectionClock",
    "RecognisingContext",
    "Signal",
    "connection_age_cheater",
    "gossip_cheater",
    "late_step_cheater",
    "rare_cheater",
    "targeting_cheater",
    "recognising_server_cls",
    "stream_reuse_cheater",
]
