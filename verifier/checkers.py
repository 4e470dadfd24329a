"""The verifier's checker identities: a few clients that live for a while.

Each checker is a `SwarmClient` under its own fresh key, exactly as a client runs one:
a host listening on loopback, a DHT client, gossipsub following the reputation topic of
the verifier it trusts, periodic discovery (info calls) and a stream pool. Spot-checks
borrow a checker (`lease`) and make their calls with the client library's own code
(probe.py), so a checker keeps its connections open and reuses idle streams between
checks, as a client does between requests. A pool keeps `size` checkers alive; each is
replaced after a lifetime drawn around `lifetime` seconds (the first ones staggered), its
successor started before it retires, so a server sees a handful of long-lived clients
rather than one new identity per check. All checkers share the verifier's SwarmView: the
verifier's own identity does not call servers for discovery.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from trustswarm.client.swarm import SwarmClient, SwarmView
from trustswarm.protocol.errors import TrustswarmError, trustswarm_error_in
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host

log = logging.getLogger("trustswarm.verifier")


class NoChecker(TrustswarmError):
    """No checker client is ready (the pool is starting or cannot reach the swarm)."""


@dataclass(eq=False)
class Checker:
    swarm: SwarmClient
    born: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    ready: bool = False
    retiring: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    gone: trio.Event = field(default_factory=trio.Event)

    @property
    def peer_id(self) -> str:
        return str(self.swarm.host.get_id())


class CheckerPool:
    def __init__(
        self,
        view: SwarmView,
        initial_peers: Sequence[str],
        swarm_key: str | None = None,
        size: int = 3,
        lifetime: float = 600.0,
        refresh_every: float = 30.0,
        connect_timeout: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        if size < 1 or not lifetime > 0:
            raise ValueError("a checker pool needs size >= 1 and a positive lifetime")
        self.view = view
        self.initial_peers = list(initial_peers)
        self.swarm_key = swarm_key
        self.size = size
        self.lifetime = lifetime
        self.refresh_every = refresh_every
        self.connect_timeout = connect_timeout
        self.rng = rng or random.Random()
        self.checkers: list[Checker] = []  # alive now (ready or starting)
        self.identities: deque[str] = deque(maxlen=1000)  # checker peer ids, oldest first
        self.retire_wait = 120.0  # seconds a retiring checker waits for its checks

    def ready(self) -> list[Checker]:
        return [c for c in self.checkers if c.ready and not c.retiring]

    def choose(self) -> Checker:
        ready = self.ready()
        if not ready:
            raise NoChecker("no checker client is ready yet")
        return self.rng.choice(ready)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Checker]:
        """A ready checker for one check; it does not retire while the check runs."""
        checker = self.choose()
        checker.in_flight += 1
        try:
            yield checker
        finally:
            checker.in_flight -= 1

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep `size` checkers alive until cancelled; started once the first is ready."""
        async with trio.open_nursery() as nursery:
            for i in range(self.size):
                nursery.start_soon(self._slot, nursery, i)
            with trio.move_on_after(2 * self.connect_timeout + 5):
                while not self.ready():
                    await trio.sleep(0.05)
            task_status.started()
            await trio.sleep_forever()

    async def _slot(self, nursery: trio.Nursery, index: int) -> None:
        """One checker at a time in this slot: replaced when its life ends or it dies."""
        current = await self._spawn(nursery)
        # The first lifetimes are staggered so the checkers do not all rotate at once.
        life = self.lifetime * (index + self.rng.random()) / self.size
        while True:
            with trio.move_on_after(life):
                await current.gone.wait()
            successor = await self._spawn(nursery)
            nursery.start_soon(self._retire, current)
            current = successor
            life = self.lifetime * self.rng.uniform(0.5, 1.5)

    async def _spawn(self, nursery: trio.Nursery) -> Checker:
        delay = 1.0
        while True:
            host = make_host(Identity.generate(), self.swarm_key)
            swarm = SwarmClient(
                host,
                self.view,
                self.initial_peers,
                connect_timeout=self.connect_timeout,
                refresh_every=self.refresh_every,
            )
            checker = Checker(swarm)
            self.checkers.append(checker)
            try:
                await nursery.start(self._live, checker)
            except Exception as exc:  # unreachable swarm, no servers yet: try again later
                self._forget(checker)
                cause = trustswarm_error_in(exc) or exc
                log.warning("checker client could not join the swarm: %r", cause)
                await trio.sleep(delay)
                delay = min(30.0, 2 * delay)
                continue
            log.info("checker %s joined the swarm", checker.peer_id)
            return checker

    async def _live(self, checker: Checker, task_status: trio.TaskStatus[None]) -> None:
        started = False
        try:
            with checker.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(checker.swarm.run)
                    self.identities.append(checker.peer_id)
                    checker.ready = started = True
                    task_status.started()
        except Exception as exc:
            if not started:
                raise
            log.warning("checker %s stopped: %s", checker.peer_id, exc)
        finally:
            self._forget(checker)

    async def _retire(self, checker: Checker) -> None:
        checker.retiring = True
        with trio.move_on_after(self.retire_wait):
            while checker.in_flight:
                await trio.sleep(0.1)
        checker.scope.cancel()
        log.info("checker %s retired", checker.peer_id)

    def _forget(self, checker: Checker) -> None:
        checker.ready = False
        checker.gone.set()
        if checker in self.checkers:
            self.checkers.remove(checker)
