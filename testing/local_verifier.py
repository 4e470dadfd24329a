"""Testing only: a real Verifier daemon inside a LocalSwarm's loop, and polling."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from trustswarm.protocol.identity import Identity
from trustswarm.reputation.store import ReputationStore
from trustswarm.testing.local_swarm import LOOPBACK, LocalSwarm, RunningServer
from trustswarm.verifier.daemon import Verifier, VerifierConfig


@dataclass
class RunningVerifier:
    verifier: Verifier
    addrs: list[str]
    scope: trio.CancelScope

    @property
    def peer_id(self) -> str:
        return self.verifier.peer_id

    @property
    def store(self) -> ReputationStore:
        return self.verifier.store


def start_verifier(
    swarm: LocalSwarm,
    db_url: str,
    config: VerifierConfig,
    identity: Identity | None = None,
    seed: int = 0,
) -> RunningVerifier:
    import random

    verifier = Verifier(
        identity=identity or Identity.generate(),
        model_dir=swarm.model_dir,
        store=ReputationStore(db_url),
        config=config,
        rng=random.Random(seed),
    )
    initial = swarm.initial_peers

    async def launch() -> RunningVerifier:
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            with scope:
                await verifier.serve([LOOPBACK], initial, task_status=task_status)

        addrs = await swarm.start_task(run)
        return RunningVerifier(verifier, addrs, scope)

    return swarm.loop.run(launch)


def stop_verifier(swarm: LocalSwarm, running: RunningVerifier) -> None:
    async def cancel() -> None:
        running.scope.cancel()
        await trio.sleep(0.05)

    swarm.loop.run(cancel)
    running.verifier.store.close()


def server_ctx(running: RunningServer):  # noqa: ANN201 - the server's ServingContext
    return running.server.ctx


def wait_until(predicate: Callable[[], object], timeout: float, every: float = 0.1) -> float:
    """Poll until predicate() is truthy; return the seconds it took. Fails on timeout."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(every)
    return time.monotonic() - began
