"""The health page's view of the swarm, kept fresh in a trio thread.

One `SwarmClient` per model (the client's own discovery, RTT measurement and trust
feed: the same code a model client runs), in a `BackgroundLoop`. Every second a
`SwarmSnapshot` is built inside that loop (so no view is read while it changes) and
published by plain assignment; the web app (asyncio, under uvicorn) only reads
`HealthCollector.latest`.

Without `--model-id`, the models are those the initial peers announce or know (at
most MAX_MODELS of them, the most announced first: anyone can sign an announcement
for any name, so a flood of made-up model ids must not start a flood of watchers).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import multiaddr
import trio

from trustswarm.client.loop import BackgroundLoop
from trustswarm.client.swarm import SwarmClient, SwarmView
from trustswarm.client.trust import make_trust_view
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.info import call_info
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host

from .errors import HealthError
from .state import SwarmSnapshot, snapshot_model

log = logging.getLogger("trustswarm.health")
MAX_MODELS = 16
SNAPSHOT_EVERY = 1.0  # seconds
_MAX_ERROR = 300  # characters of an error message kept for the page


@dataclass
class ModelWatch:
    view: SwarmView
    error: str | None = "not contacted yet"


@dataclass
class HealthCollector:
    initial_peers: Sequence[str]
    trusted_verifiers: Sequence[str] = ()
    model_ids: Sequence[str] = ()  # empty: the models the initial peers announce
    refresh: float = 30.0  # seconds between swarm refreshes
    swarm_key: str | None = None
    connect_timeout: float = 10.0
    watches: dict[str, ModelWatch] = field(default_factory=dict)
    discovery_error: str | None = None
    latest: SwarmSnapshot | None = None

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise HealthError("--initial-peers must name at least one peer of the swarm")
        for addr in self.initial_peers:
            try:
                parse_peer_addr(addr)
            except Exception as exc:
                raise HealthError(f"initial peer {addr[:120]!r}: {exc}") from None
        if not (self.refresh > 0 and self.refresh < float("inf")):
            raise HealthError(f"refresh must be a positive number of seconds, not {self.refresh}")
        try:  # checks every trusted verifier (peer id or multiaddr)
            trust = self._trust_view("")
        except ValueError as exc:
            raise HealthError(str(exc)) from None
        self.verifier_ids: set[str] = trust.trusted_verifiers if trust is not None else set()
        self.latest = self.snapshot()
        self._loop = BackgroundLoop("trustswarm-health")

    def _trust_view(self, model_id: str):  # noqa: ANN202 - TrustView | None
        return make_trust_view(list(self.trusted_verifiers), 0.5, model_id)

    def start(self) -> None:
        """Start the trio thread; returns at once (the first refresh runs in it)."""

        async def setup(nursery: trio.Nursery) -> None:
            nursery.start_soon(self._models, nursery)
            nursery.start_soon(self._snapshots)

        self._loop.start(setup)

    def close(self) -> None:
        self._loop.close()

    def snapshot(self) -> SwarmSnapshot:
        now = time.time()
        models = tuple(
            snapshot_model(watch.view, now=now, error=watch.error)
            for _, watch in sorted(self.watches.items())
        )
        return SwarmSnapshot(
            taken_at=now,
            refresh_seconds=self.refresh,
            trusted_verifiers=tuple(sorted(self.verifier_ids)),
            models=models,
            error=self.discovery_error,
        )

    async def _snapshots(self) -> None:
        while True:
            try:
                self.latest = self.snapshot()
            except Exception:  # a bug here must not stop the page from refreshing
                log.exception("building the health snapshot failed")
            await trio.sleep(min(SNAPSHOT_EVERY, self.refresh))

    async def _models(self, nursery: trio.Nursery) -> None:
        """Watch the given models, or keep discovering which models the swarm serves."""
        while True:
            wanted = list(self.model_ids)
            if not wanted:
                try:
                    wanted = await self._discover()
                    self.discovery_error = None if wanted else "the initial peers serve no model"
                except Exception as exc:
                    self.discovery_error = short_error(exc)
            for model_id in wanted[: MAX_MODELS - len(self.watches)]:
                if model_id not in self.watches:
                    watch = ModelWatch(SwarmView(model_id, None, trust=self._trust_view(model_id)))
                    self.watches[model_id] = watch
                    nursery.start_soon(self._watch, watch)
            if self.model_ids or len(self.watches) >= MAX_MODELS:
                return
            await trio.sleep(self.refresh)

    async def _discover(self) -> list[str]:
        """Model ids the initial peers announce or know, the most announced first."""
        counts: Counter[str] = Counter()
        host = make_host(Identity.generate(), self.swarm_key)
        async with running_host(host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):

            async def ask(addr: str) -> None:
                info = parse_peer_addr(addr)
                try:
                    with trio.fail_after(self.connect_timeout):
                        await host.connect(info)
                    answer = await call_info(host, info.peer_id, self.connect_timeout)
                except Exception as exc:
                    log.debug("initial peer %s did not answer info: %s", addr, exc)
                    return
                for signed in [answer.announcement, *answer.known]:
                    counts[signed.announcement.model_id] += 1

            async with trio.open_nursery() as inner:
                for addr in self.initial_peers:
                    inner.start_soon(ask, addr)
        if not counts:
            raise HealthError("no initial peer answered")
        return [model for model, _ in counts.most_common()]

    async def _watch(self, watch: ModelWatch) -> None:
        """Run the client's swarm discovery for one model; after a failure, start over
        with a fresh host (keeping what the view already knows)."""
        while True:
            client = SwarmClient(
                make_host(Identity.generate(), self.swarm_key),
                watch.view,
                self.initial_peers,
                connect_timeout=self.connect_timeout,
                refresh_every=self.refresh,
            )
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(client.run)
                    watch.error = None
            except Exception as exc:
                watch.error = short_error(exc)
                log.warning("watching %s failed: %s", watch.view.model_id[:80], watch.error)
            await trio.sleep(self.refresh)


def short_error(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR] + "…"
