"""Output and weight tampering attacks: one adversary at a time joins the honest swarm.

For each attack (a tests/adversary.py server serving blocks 0:3, announcing 100x its
real speed), in this order:

1. verifier: a client with redundancy=1 that trusts the running verifier (default
   settings) generates greedily in a loop, forced to route to the adversary whenever
   its reputation allows it (worst case); we record the seconds from the adversary's
   start until the client excludes it (a ban or a score below min_reputation from
   the verifier) and the wrong tokens that reached that client's output until then;
2. redundancy k = 1, 2, 3: a fresh client (not trusting the verifier) forced to
   prefer the adversary generates every prompt; for k >= 2 we record whether a
   disagreement report named the adversary, the seconds from the first request
   until then, and the wrong tokens in the output (k=1 shows the attack's effect).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.testing.adversary import Tamper, adversarial_server_cls
from trustswarm.testing.attack_env import FIRST, Env, generate_all, learn, prefer
from trustswarm.testing.local_swarm import RunningServer
from trustswarm.testing.local_verifier import RunningVerifier

ATTACKS: list[tuple[str, Tamper]] = [
    ("output noise 1% of RMS", Tamper("noise", amount=0.01, seed=1)),
    ("output noise 1% of RMS, bfloat16 server", Tamper("noise", amount=0.01, seed=7)),
    ("output noise 5% of RMS", Tamper("noise", amount=0.05, seed=2)),
    ("output noise 50% of RMS", Tamper("noise", amount=0.5, seed=3)),
    ("output scaled x1.05", Tamper("scale", amount=0.05)),
    ("skipped block", Tamper("skip_block")),
    ("another block's weights", Tamper("wrong_weights")),
    ("4-bit quantised weights", Tamper("quantized", bits=4)),
    ("noise 5% on 10% of answers", Tamper("noise", amount=0.05, fraction=0.1, seed=4)),
    ("noise 5% only for never-seen peers", Tamper("noise", amount=0.05, peers="new", seed=5)),
    ("noise 5% only for peers seen before", Tamper("noise", amount=0.05, peers="seen", seed=6)),
    ("replayed earlier answer", Tamper("replay")),
]


@dataclass
class RedundancyResult:
    k: int
    detected: bool = False
    seconds: float | None = None  # first request -> adversary named in a report
    wrong: int = 0
    tokens: int = 0
    failed: int = 0  # generations that raised (e.g. unresolved k=2 disagreement)
    honest_accused: int = 0


@dataclass
class VerifierResult:
    detected: bool = False  # the trusting client stopped using the adversary
    banned: bool = False  # the verifier's store says banned (proof kept)
    seconds: float | None = None  # adversary start -> excluded by the client
    wrong: int = 0  # wrong tokens in the trusting client's output until exclusion
    tokens: int = 0
    checks_of_adversary: int = 0


@dataclass
class AttackRow:
    attack: str
    tamper: dict
    verifier: VerifierResult
    redundancy: dict[int, RedundancyResult] = field(default_factory=dict)
    tampered_answers: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase

    def to_json(self) -> dict:
        out = asdict(self)
        out["redundancy"] = {str(k): asdict(v) for k, v in self.redundancy.items()}
        return out


def _watch(predicate, began: float, stop: threading.Event) -> list[float]:  # noqa: ANN001
    """Poll predicate() in a thread; the list gets the seconds since `began` when it holds."""
    seen: list[float] = []

    def run() -> None:
        while not stop.is_set():
            if predicate():
                seen.append(time.monotonic() - began)
                return
            time.sleep(0.02)

    threading.Thread(target=run, daemon=True).start()
    return seen


def verifier_phase(
    env: Env,
    verifier: RunningVerifier,
    adversary: RunningServer,
    began: float,
    timeout: float,
    model: DistributedModelForCausalLM | None = None,
) -> VerifierResult:
    """`model`: a client with redundancy=1 trusting `verifier` (made if None).
    A timeout <= 0 skips this phase."""
    adversary_peer = adversary.peer_id
    result = VerifierResult()
    if timeout <= 0:
        return result
    own = model is None
    if model is None:
        model = env.client(1, trusted_verifiers=[verifier.peer_id])
    try:
        learn(model, [adversary])
        trust = model.swarm.view.trust
        stop = threading.Event()
        excluded = _watch(lambda: not trust.allowed(adversary_peer), began, stop)
        one = env.prompts.first(1)
        while not excluded and time.monotonic() - began < timeout:
            wrong, tokens, _ = generate_all(model, one, lambda: prefer(model, adversary_peer))
            result.wrong += wrong
            result.tokens += tokens
        stop.set()
        if excluded:
            result.detected, result.seconds = True, excluded[0]
        rep = verifier.store.get(adversary_peer, verifier.verifier.model_id)
        result.banned = rep is not None and rep.state == "banned"
        result.checks_of_adversary = sum(
            r.peer_id == adversary_peer and r.outcome not in ("skipped", "refused")
            for r in list(verifier.verifier.results)
        )
    finally:
        if own:
            model.close()
    return result


def redundancy_phase(
    env: Env, adversary: RunningServer, model: DistributedModelForCausalLM, prompts: int = 1
) -> RedundancyResult:
    """`model`: a client with redundancy k that trusts no verifier (reused across attacks:
    only the reports about this adversary's run count)."""
    adversary_peer = adversary.peer_id
    result = RedundancyResult(model.redundancy)
    began = [0.0]
    view = model.swarm.view

    def on_disagreement(report) -> None:  # noqa: ANN001
        if adversary_peer in report.minority and result.seconds is None:
            result.seconds = time.monotonic() - began[0]

    view.on_disagreement = on_disagreement
    seen = len(view.trust_events)
    try:
        learn(model, [adversary])
        began[0] = time.monotonic()
        result.wrong, result.tokens, result.failed = generate_all(
            model, env.prompts.first(prompts), lambda: prefer(model, adversary_peer)
        )
        reports = list(view.trust_events[seen:])
        result.detected = any(adversary_peer in r.minority for r in reports)
        result.honest_accused = len({p for r in reports for p in r.minority if p != adversary_peer})
    finally:
        view.on_disagreement = None
    return result


def run_attack(
    env: Env,
    verifier: RunningVerifier,
    name: str,
    tamper: Tamper,
    verifier_timeout: float,
    clients: dict[int, DistributedModelForCausalLM],
    trusting: DistributedModelForCausalLM | None = None,
) -> AttackRow:
    """`clients`: redundancy k -> a client with that k; `trusting`: see verifier_phase."""
    dtype = torch.bfloat16 if "bfloat16" in name else torch.float32
    adversary = env.swarm.start_server(
        FIRST, dtype=dtype, server_cls=adversarial_server_cls(tamper, 100.0)
    )
    began = time.monotonic()
    try:
        row = AttackRow(
            name,
            dict(asdict(tamper)),
            verifier_phase(env, verifier, adversary, began, verifier_timeout, trusting),
        )
        row.phase_seconds["verifier"] = time.monotonic() - began
        for k, model in sorted(clients.items()):
            t = time.monotonic()
            row.redundancy[k] = redundancy_phase(env, adversary, model)
            row.phase_seconds[f"k={k}"] = time.monotonic() - t
        row.tampered_answers = adversary.server.tampered
        return row
    finally:
        env.swarm.kill(adversary)
