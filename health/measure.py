"""Measured throughput: one small timed forward request per server now and then.

Servers announce the tokens/s they measured themselves at start, and a Sybil that
boasts its speed attracts routes. The health collector checks the claim with the
client's own forward call (client/rpc.py `call_span`: the signed answer is verified as
any client verifies it): `tokens` tokens of random hidden states through the server's
whole span, as the server measured itself. The stream is opened before the clock
starts (opening one costs several round trips in py-libp2p) and the info RTT is
subtracted, so what is left is the server's compute and the transfer of a few KB.

The cost to servers is bounded: at most one request per server per `every` seconds
(jittered), `concurrency` requests at once over all models, `tokens` <= MAX_TOKENS,
each ended after `timeout` seconds. Off with `MeasureConfig(enabled=False)`. A server
whose last request failed waits FAILED_BACKOFF times longer: with one request at a time,
Sybils that stall until the timeout must not starve the measurement of everyone else.

A server whose measured speed times `boast_factor` is still below its announcement is
flagged as boasting. The factor is generous: a server measures itself idle, we measure
it under its real load and through the network.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import trio
from libp2p.peer.id import ID

from trustswarm.client.rpc import SpanCall, StreamPool, call_span, close_quietly, open_stream
from trustswarm.client.swarm import SwarmClient
from trustswarm.protocol import protocols
from trustswarm.protocol.announcement import Announcement

from .errors import HealthError

log = logging.getLogger("trustswarm.health")
MAX_TOKENS = 256
# However much of a request the RTT seems to take, at least this share of it counts as
# compute: RTT jitter must not turn a fast answer into an unbounded speed.
MIN_COMPUTE_SHARE = 0.25
_MAX_ERROR = 200
SCAN_EVERY = 2.0  # seconds between looks for servers that are due
FAILED_BACKOFF = 4.0


@dataclass(frozen=True)
class MeasureConfig:
    enabled: bool = True
    every: float = 300.0  # seconds between two measurements of one server
    tokens: int = 16  # per request (servers measure themselves with 16)
    concurrency: int = 1  # requests in flight at once, over all models
    timeout: float = 20.0  # seconds per request
    boast_factor: float = 4.0

    def __post_init__(self) -> None:
        checks = (
            ("every", self.every, 1.0, 86400.0),
            ("timeout", self.timeout, 0.1, 300.0),
            ("boast_factor", self.boast_factor, 1.0, 1e6),
        )
        for name, value, low, high in checks:
            if type(value) not in (int, float) or not low <= value <= high:
                raise HealthError(f"measure {name} must lie in [{low:g}, {high:g}], got {value!r}")
        for name, value, high in (
            ("tokens", self.tokens, MAX_TOKENS),
            ("concurrency", self.concurrency, 16),
        ):
            if type(value) is not int or not 1 <= value <= high:
                raise HealthError(
                    f"measure {name} must be an integer in [1, {high}], got {value!r}"
                )


@dataclass(frozen=True)
class Measurement:
    at: float  # wall time the request ended
    tokens: int
    seconds: float | None  # the request's wall time (None: it failed)
    rtt: float | None  # the server's info RTT we subtracted
    tokens_per_second: float | None
    error: str | None = None


def net_throughput(tokens: int, seconds: float, rtt: float | None) -> float | None:
    """Tokens per second of a request that took `seconds`, net of one round trip `rtt`
    (at least MIN_COMPUTE_SHARE of the request counts as compute). None when `seconds`
    is not a positive finite time or the speed would not be finite."""
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
        return None
    if tokens <= 0:
        return None
    usable_rtt = rtt if isinstance(rtt, int | float) and math.isfinite(rtt) and rtt > 0 else 0.0
    compute = max(seconds - usable_rtt, MIN_COMPUTE_SHARE * seconds)
    if compute <= 0:  # a subnormal time
        return None
    speed = tokens / compute
    return speed if math.isfinite(speed) else None  # a subnormal time overflows


def boasting(announced: float, measured: float | None, factor: float) -> bool:
    """Whether a server announces more than `factor` times the speed we measured."""
    if measured is None or not math.isfinite(measured) or measured < 0:
        return False
    if not (isinstance(announced, int | float) and math.isfinite(announced)):
        return False
    return measured * factor < announced


@dataclass
class ThroughputProbe:
    """Measures the servers of one model (`run` with that model's SwarmClient)."""

    config: MeasureConfig
    hidden_size: int
    limiter: trio.CapacityLimiter  # shared by the probes of every model
    rng: random.Random = field(default_factory=random.Random)
    results: dict[str, Measurement] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)  # sent so far, per peer id
    _due: dict[str, float] = field(default_factory=dict)  # peer id -> monotonic time

    async def run(self, client: SwarmClient) -> None:
        hidden, positions = await trio.to_thread.run_sync(self._inputs)
        async with trio.open_nursery() as nursery:
            while True:
                for ann in self.due(client):
                    # One borrower per request: the same peer id may serve two models.
                    borrower = object()
                    await self.limiter.acquire_on_behalf_of(borrower)
                    self._due[ann.peer_id] = math.inf  # not again until this one ends
                    nursery.start_soon(self._one, client, ann, hidden, positions, borrower)
                await trio.sleep(min(SCAN_EVERY, self.config.every))

    def due(self, client: SwarmClient) -> list[Announcement]:
        now, wall = time.monotonic(), time.time()
        servers = client.view.servers
        for gone in set(self._due) - set(servers):  # forget servers that left
            self._due.pop(gone, None)
            self.results.pop(gone, None)
        return [
            ann
            for peer, ann in list(servers.items())
            if not ann.expired(wall) and self._due.get(peer, 0.0) <= now
        ]

    def _inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.config.tokens
        return torch.randn(1, tokens, self.hidden_size), torch.arange(tokens).unsqueeze(0)

    async def _one(
        self,
        client: SwarmClient,
        ann: Announcement,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        borrower: object,
    ) -> None:
        self.requests[ann.peer_id] += 1
        delay = self.config.every * FAILED_BACKOFF
        try:
            self.results[ann.peer_id] = await self.measure(client, ann, hidden, positions)
            delay = self.config.every
        except Exception as exc:  # noqa: BLE001 - whatever the server did, it is a result
            self.results[ann.peer_id] = Measurement(
                time.time(), self.config.tokens, None, None, None, _short(exc)
            )
        finally:
            self.limiter.release_on_behalf_of(borrower)
            jitter = self.rng.uniform(0.9, 1.1)  # servers cannot time our visits exactly
            self._due[ann.peer_id] = time.monotonic() + delay * jitter

    async def measure(
        self, client: SwarmClient, ann: Announcement, hidden: torch.Tensor, positions: torch.Tensor
    ) -> Measurement:
        """One timed forward through the server's span. Raises on any failure."""
        call = SpanCall(
            ID.from_base58(ann.peer_id),
            ann.model_id,
            ann.start,
            ann.end,
            ann.weights_digest,  # a monitor has no manifest: the announced weights
            ann.dtype,
        )
        timeout = self.config.timeout
        pool = StreamPool(max_per_key=1)
        with trio.fail_after(timeout):
            await client.ensure_connected(call.peer_id)
            stream = await open_stream(client.host, call.peer_id, protocols.FORWARD, timeout)
            await pool.give(call.peer_id, protocols.FORWARD, stream)
            began = time.perf_counter()
            try:
                output, _ = await call_span(
                    client.host,
                    call,
                    protocols.FORWARD,
                    "forward",
                    {"hidden_states": hidden, "position_ids": positions},
                    "hidden_states",
                    timeout,
                    pool=pool,
                )
                seconds = time.perf_counter() - began
            finally:
                await close_quietly(await pool.take(call.peer_id, protocols.FORWARD))
        if output.shape != hidden.shape:
            raise HealthError(f"forward answer has shape {list(output.shape)}")
        rtt = client.view.rtts.get(ann.peer_id)
        tokens = self.config.tokens
        return Measurement(time.time(), tokens, seconds, rtt, net_throughput(tokens, seconds, rtt))


def _short(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR] + "…"
