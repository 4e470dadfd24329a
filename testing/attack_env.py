"""Shared set-up of the adversary suite: a loopback swarm of the tiny model, the honest
reference (Hugging Face, float32, all blocks local), clients, and token accounting.

Testing only: nothing here is reachable from `trustswarm node start`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.testing.local_swarm import LocalSwarm, RunningServer

FULL = (0, 6)  # the tiny model has 6 blocks
FIRST, SECOND = (0, 3), (3, 6)


@dataclass
class Prompts:
    """Fixed prompts and the honest greedy continuation of each (local HF, float32)."""

    ids: list[torch.Tensor]
    honest: list[list[int]]
    new_tokens: int

    @classmethod
    def make(cls, hf_dir: Path, count: int = 2, new_tokens: int = 12, seed: int = 5) -> Prompts:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(seed)
        ids = [torch.randint(3, 512, (1, 6 + 3 * i), generator=gen) for i in range(count)]
        honest = []
        with torch.no_grad():
            for x in ids:
                out = model.generate(
                    x,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=[],  # never stop: both sides generate every token
                    pad_token_id=0,
                    attention_mask=torch.ones_like(x),
                )
                honest.append(out[0, x.shape[1] :].tolist())
        return cls(ids, honest, new_tokens)

    def first(self, count: int) -> Prompts:
        return Prompts(self.ids[:count], self.honest[:count], self.new_tokens)


def wrong_tokens(got: list[int], honest: list[int]) -> int:
    """Generated positions whose token differs from the honest greedy token."""
    return sum(a != b for a, b in zip(got, honest, strict=True))


@dataclass
class Env:
    """One loopback swarm: honest servers on blocks 0:3 and 3:6 (the adversaries of the
    suite serve 0:3, so a cheat acts mid-model, not on the last block whose uniform
    errors the final RMSNorm would hide)."""

    model_dir: Path
    prompts: Prompts
    swarm: LocalSwarm
    honest: list[RunningServer] = field(default_factory=list)

    @classmethod
    def start(cls, model_dir: Path, honest_per_span: int = 3, **prompt_kw: object) -> Env:
        prompts = Prompts.make(model_dir.parent / "hf", **prompt_kw)
        swarm = LocalSwarm(model_dir)
        env = cls(model_dir, prompts, swarm)
        for span in (FIRST, SECOND):
            for _ in range(honest_per_span):
                env.honest.append(swarm.start_server(span))
        return env

    def client(self, k: int = 1, **kwargs: object) -> DistributedModelForCausalLM:
        model = DistributedModelForCausalLM.from_pretrained(
            self.model_dir, self.swarm.initial_peers, redundancy=k, **kwargs
        )
        return model

    def close(self) -> None:
        self.swarm.close()


def learn(
    model: DistributedModelForCausalLM, servers: list[RunningServer], timeout: float = 20.0
) -> None:
    """Make sure the client knows every server in `servers` (see `introduce`)."""
    deadline = time.monotonic() + timeout
    view = model.swarm.view
    while True:
        missing = [s for s in servers if s.peer_id not in view.servers]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"client did not learn {len(missing)} server(s) in {timeout} s")
        introduce(model, missing)


def introduce(model: DistributedModelForCausalLM, servers: list[RunningServer]) -> None:
    """Hand the client these servers' signed announcements, as a DHT lookup would (the
    DHT spreads new records to the closest peers, not to the client's initial peers, so
    a refresh alone may take a while to find them), then refresh (RTTs, liveness)."""
    view = model.swarm.view
    for running in servers:
        view.consider(running.server.announcement)
    model.run_async(model.swarm.refresh)


def prefer(model: DistributedModelForCausalLM, peer: str) -> None:
    """Make `peer` the cheapest server in the client's eyes (worst case: the client
    routes to the adversary whenever nothing else forbids it)."""
    view = model.swarm.view
    for other in view.servers:
        view.rtts[other] = 0.0 if other == peer else 0.5


def generate_all(
    model: DistributedModelForCausalLM, prompts: Prompts, before: Callable[[], None] | None = None
) -> tuple[int, int, int]:
    """Greedy-generate every prompt; returns (wrong tokens, tokens, failed generations)."""
    wrong = total = failed = 0
    for ids, honest in zip(prompts.ids, prompts.honest, strict=True):
        if before is not None:
            before()
        total += len(honest)
        try:
            out = model.generate(ids, max_new_tokens=prompts.new_tokens, eos_token_id=[])
        except Exception:
            failed += 1
            continue
        wrong += wrong_tokens(out[0, ids.shape[1] :].tolist(), honest)
    return wrong, total, failed


def wait_for(predicate: Callable[[], object], timeout: float, every: float = 0.05) -> float | None:
    """Seconds until predicate() holds, or None on timeout."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            return None
        time.sleep(every)
    return time.monotonic() - began
