"""False positives: honest float32 and bfloat16 servers under many verifier spot-checks
and many redundancy comparisons. Goal: no honest server penalised.

A separate loopback swarm: two float32 and two bfloat16 servers of all 6 blocks, one
verifier whose background loop is idle (we drive `SpotChecker.check` directly, so the
count is exact and nothing waits for the Poisson timer), and a redundancy=3 client
(every set of 3 replicas mixes both dtypes) doing forward passes and generations.
Comparisons are counted by wrapping the comparator the client's vote uses.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

import trustswarm.client.agreement as agreement
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.testing.attack_env import FULL, introduce
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.testing.local_verifier import start_verifier, stop_verifier
from trustswarm.verifier.daemon import VerifierConfig
from trustswarm.verifier.spotcheck import PASS, REFUSED, SKIPPED, CheckConfig


@dataclass
class FalsePositives:
    servers: dict[str, str] = field(default_factory=dict)  # peer id -> dtype
    checks: int = 0
    checks_by_dtype: dict[str, int] = field(default_factory=dict)
    check_failures: list[str] = field(default_factory=list)
    checks_skipped: int = 0
    check_seconds: float = 0.0
    redundant_calls: int = 0
    comparisons: int = 0
    disagreements: int = 0
    redundancy_seconds: float = 0.0
    redundancy_errors: list[str] = field(default_factory=list)
    by_call_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    disagreements_by_kind: dict[str, int] = field(default_factory=dict)
    disagreement_sides: dict[str, int] = field(default_factory=dict)  # "dtype in side" -> n
    penalised: list[str] = field(default_factory=list)  # honest servers with any penalty
    penalised_by_verifier: list[str] = field(default_factory=list)
    penalised_by_redundancy: list[str] = field(default_factory=list)  # outvoted in a vote


def run(
    model_dir: Path, db_url: str, check_budget: float, redundancy_budget: float
) -> FalsePositives:
    out = FalsePositives()
    swarm = LocalSwarm(model_dir)
    verifier = None
    try:
        for dtype in (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16):
            running = swarm.start_server(FULL, dtype=dtype)
            out.servers[running.peer_id] = str(dtype).removeprefix("torch.")
        config = VerifierConfig(checks=CheckConfig(check_every=3600.0))
        verifier = start_verifier(swarm, db_url, config, seed=3)
        v = verifier.verifier
        deadline = time.monotonic() + 30
        while len(v.view.servers) < len(out.servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        peers = list(out.servers)
        began = time.monotonic()
        while time.monotonic() - began < check_budget:
            peer = peers[out.checks % len(peers)]
            result = swarm.loop.run(v.checker.check, v.view.servers[peer])
            out.checks += 1
            dtype = out.servers[peer]
            out.checks_by_dtype[dtype] = out.checks_by_dtype.get(dtype, 0) + 1
            if result.outcome in (SKIPPED, REFUSED):  # no answer: not about honesty
                out.checks_skipped += 1
            elif result.outcome != PASS:
                out.check_failures.append(f"{dtype} {result.kind}: {result.detail[:200]}")
        out.check_seconds = time.monotonic() - began

        calls = [0]
        original = agreement.compare

        def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[0] += 1
            return original(*args, **kwargs)

        agreement.compare = counting
        events: list = []
        try:
            for kind, inference in (("forward", False), ("inference", True)):
                before = calls[0]
                n, found, errors = _redundancy(swarm, model_dir, redundancy_budget / 2, inference)
                out.by_call_kind[kind] = {
                    "calls": n,
                    "comparisons": calls[0] - before,
                    "disagreements": len(found),
                    "clients_out_of_servers": len(errors),
                }
                out.redundant_calls += n
                out.redundancy_errors += errors
                events += found
        finally:
            agreement.compare = original
        out.comparisons = calls[0]
        out.redundancy_seconds = redundancy_budget
        out.disagreements = len(events)
        out.disagreements_by_kind = dict(Counter(e.kind for e in events))
        for event in events:
            for answer in event.answers:
                dtype = out.servers.get(answer.peer_id, "?")
                side = "minority" if answer.peer_id in event.minority else "majority"
                key = f"{dtype} in {side}"
                out.disagreement_sides[key] = out.disagreement_sides.get(key, 0) + 1
        accused = {p for e in events for p in e.minority}
        for peer in peers:
            rep = verifier.store.get(peer, v.model_id)
            by_verifier = rep is not None and (rep.failures > 0 or rep.state == "banned")
            if by_verifier:
                out.penalised_by_verifier.append(peer)
            if peer in accused:
                out.penalised_by_redundancy.append(peer)
            if by_verifier or peer in accused:
                out.penalised.append(peer)
        return out
    finally:
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()


def _redundancy(
    swarm: LocalSwarm, model_dir: Path, budget: float, inference: bool
) -> tuple[int, list, list]:
    """Forward passes (or generations) with redundancy=3 until `budget` seconds are
    used; returns (redundant calls, disagreement reports, errors). A client that runs
    out of servers (honest ones outvoted) is replaced by a fresh one."""
    calls = 0
    events: list = []
    errors: list[str] = []
    gen = torch.Generator().manual_seed(9 + inference)
    began = time.monotonic()
    i = 0
    while time.monotonic() - began < budget:
        with DistributedModelForCausalLM.from_pretrained(
            model_dir, swarm.initial_peers, redundancy=3
        ) as model:
            introduce(model, [s for s in swarm.servers if s.alive])
            try:
                while time.monotonic() - began < budget:
                    i += 1
                    ids = torch.randint(3, 512, (1 + i % 2, 4 + i % 13), generator=gen)
                    if inference:
                        new = 8
                        model.generate(ids, max_new_tokens=new, eos_token_id=[])
                        calls += new  # one redundant step per token
                    else:
                        with torch.no_grad():
                            model(input_ids=ids)
                        calls += 1  # one span: the replicas all serve blocks 0:6
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            events.extend(model.trust_events)
    return calls, events, errors
