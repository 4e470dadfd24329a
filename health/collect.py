"""The health page's view of the swarm, kept fresh in a trio thread.

One `SwarmClient` per model (the client's own discovery, RTT measurement and trust
feed: the same code a model client runs), in a `BackgroundLoop`. Every second a
`SwarmSnapshot` is built inside that loop (so no view is read while it changes) and
published by plain assignment; the web app (asyncio, under uvicorn) only reads
`HealthCollector.latest`.

Without `--model-id`, the models are those the initial peers announce or know (at
most MAX_MODELS of them, the most announced first: anyone can sign an announcement
for any name, so a flood of made-up model ids must not start a flood of watchers).

Models given by their manifest (`--model DIR`) are always watched, shown with the
manifest's block count, and their servers' throughput is measured by timed forward
requests (health/measure.py; the manifest gives the hidden size such a request needs).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import multiaddr
import trio

from trustswarm.client.loop import BackgroundLoop
from trustswarm.client.swarm import SwarmClient, SwarmView
from trustswarm.client.trust import make_trust_view
from trustswarm.models.errors import ModelDirError
from trustswarm.models.manifest import Manifest
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.info import call_info
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host

from .errors import HealthError
from .measure import MeasureConfig, ThroughputProbe
from .state import SwarmSnapshot, snapshot_model

log = logging.getLogger("trustswarm.health")
MAX_MODELS = 16
SNAPSHOT_EVERY = 1.0  # seconds
_MAX_ERROR = 300  # characters of an error message kept for the page


@dataclass
class ModelWatch:
    view: SwarmView
    error: str | None = "not contacted yet"
    manifest: Manifest | None = None
    probe: ThroughputProbe | None = None  # measures the servers (needs the manifest)


@dataclass
class HealthCollector:
    initial_peers: Sequence[str]
    trusted_verifiers: Sequence[str] = ()
    model_ids: Sequence[str] = ()  # empty: the models the initial peers announce
    refresh: float = 30.0  # seconds between swarm refreshes
    swarm_key: str | None = None
    connect_timeout: float = 10.0
    manifests: Sequence[Manifest] = ()  # models always watched, and measured
    measure: MeasureConfig = field(default_factory=MeasureConfig)
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
        self._manifests = {m.model_id: m for m in self.manifests}
        if len(self._manifests) > MAX_MODELS:
            raise HealthError(f"at most {MAX_MODELS} models can be watched")
        self._limiter: trio.CapacityLimiter | None = None  # made in the trio thread
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
            snapshot_model(
                watch.view,
                num_blocks=None if watch.manifest is None else watch.manifest.num_blocks,
                now=now,
                error=watch.error,
                measurements=None if watch.probe is None else watch.probe.results,
                boast_factor=self.measure.boast_factor,
            )
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
            wanted = list(self._manifests) + [m for m in self.model_ids if m not in self._manifests]
            if not self.model_ids:
                try:
                    wanted += await self._discover()
                    self.discovery_error = None if wanted else "the initial peers serve no model"
                except Exception as exc:
                    self.discovery_error = short_error(exc)
            for model_id in dict.fromkeys(wanted):
                if model_id not in self.watches and len(self.watches) < MAX_MODELS:
                    watch = self._new_watch(model_id)
                    self.watches[model_id] = watch
                    nursery.start_soon(self._watch, watch)
            if self.model_ids or len(self.watches) >= MAX_MODELS:
                return
            await trio.sleep(self.refresh)

    def _new_watch(self, model_id: str) -> ModelWatch:
        watch = ModelWatch(SwarmView(model_id, None, trust=self._trust_view(model_id)))
        watch.manifest = self._manifests.get(model_id)
        if watch.manifest is not None and self.measure.enabled:
            if self._limiter is None:  # shared by every model's probe
                self._limiter = trio.CapacityLimiter(self.measure.concurrency)
            watch.probe = ThroughputProbe(self.measure, watch.manifest.hidden_size, self._limiter)
        return watch

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
                    if watch.probe is not None:
                        nursery.start_soon(watch.probe.run, client)
            except Exception as exc:
                watch.error = short_error(exc)
                log.warning("watching %s failed: %s", watch.view.model_id[:80], watch.error)
            await trio.sleep(self.refresh)


def load_manifest(path: Path | str) -> Manifest:
    """The manifest of a model directory (or a manifest.json file). Raises HealthError."""
    path = Path(path)
    file = path / "manifest.json" if path.is_dir() else path
    try:
        return Manifest.from_json(file.read_bytes())
    except OSError as exc:
        raise HealthError(f"cannot read {file}: {exc.strerror or exc}") from None
    except ModelDirError as exc:
        raise HealthError(f"{file}: {exc}") from None


def short_error(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR] + "…"
