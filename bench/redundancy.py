"""Per-step latency of redundancy=1, 2, 3 on loopback and behind a simulated WAN.

    python bench/redundancy.py [--steps 16] [--delay-ms 50] [--mbit 100]

Nine real `node start` processes of SmolLM2 (three per span 0:10, 10:20, 20:30)
serve every setting, so k=1, 2 and 3 use the same swarm. In the WAN setting every
server sits behind its own relay process (trustswarm/testing/relay.py) adding --delay-ms each way,
and announces the relay's address, so the client reaches servers only over that link.
The client opens an inference session with redundancy k, prefills a short prompt and
times single-token decode steps; it prints median step latencies and the ratios
k/1. Goal (issue 3): under WAN latency, redundancy=2 step <= 1.10x redundancy=1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

SPANS = ["0:10", "10:20", "20:30"]


def step_latencies(model, k: int, steps: int, prefix: int = 16) -> list[float]:
    import torch

    generator = torch.Generator().manual_seed(k)
    ids = torch.randint(3, model.config.vocab_size, (1, prefix + steps), generator=generator)
    embeds = model.get_input_embeddings()(ids).float()
    times = []
    with torch.inference_mode(), model.inference_session(prefix + steps, redundancy=k) as s:
        mask = torch.ones(1, prefix, dtype=torch.long)
        s.step(embeds[:, :prefix], torch.arange(prefix).unsqueeze(0), mask)
        for i in range(prefix, prefix + steps):
            mask = torch.ones(1, i + 1, dtype=torch.long)
            began = time.perf_counter()
            s.step(embeds[:, i : i + 1], torch.tensor([[i]]), mask)
            times.append(time.perf_counter() - began)
    if model.trust_events:
        raise RuntimeError(f"honest servers disagreed: {model.trust_events[0].detail}")
    return times


def run_setting(name: str, servers, model_dir: Path, steps: int, rounds: int) -> dict[int, list]:
    from trustswarm.client import DistributedModelForCausalLM

    medians: dict[int, list[float]] = {1: [], 2: [], 3: []}
    with DistributedModelForCausalLM.from_pretrained(
        model_dir, servers.client_peers, request_timeout=60.0
    ) as model:
        deadline = time.monotonic() + 60
        while len(model.swarm.view.servers) < 3 * len(SPANS) and time.monotonic() < deadline:
            model.run_async(model.swarm.refresh)
        step_latencies(model, 3, 2)  # warm-up: connections, RTTs, caches
        for _ in range(rounds):  # interleaved, so drift hits every k alike
            for k in medians:
                medians[k].append(statistics.median(step_latencies(model, k, steps)))
    for k, values in medians.items():
        low, mid, high = min(values), statistics.median(values), max(values)
        print(
            f"{name:9} redundancy={k}: step {mid * 1e3:7.1f} ms (min {low * 1e3:.1f}, max "
            f"{high * 1e3:.1f} over {rounds} rounds of {steps} steps)",
            flush=True,
        )
    return medians


def main(argv: list[str] | None = None) -> int:
    from table_swarm import Servers

    from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model
    from trustswarm.testing.relay import mbit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way WAN delay")
    parser.add_argument("--mbit", type=float, default=100.0, help="WAN bandwidth per relay")
    args = parser.parse_args(argv)
    ensure_model(args.model_dir)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ts-redundancy-") as tmp:
        for name, wan in (
            ("loopback", None),
            ("wan", (args.delay_ms / 1e3, mbit(args.mbit))),
        ):
            spans = [s for s in SPANS for _ in range(3)]
            with Servers(args.model_dir, Path(tmp) / name, spans, wan=wan) as servers:
                results[name] = run_setting(name, servers, args.model_dir, args.steps, args.rounds)
    print()
    for name, medians in results.items():
        base = statistics.median(medians[1])
        for k in (2, 3):
            ratio = statistics.median(medians[k]) / base
            note = ""
            if name == "wan" and k == 2:
                note = "  (goal <= 1.10: " + ("met" if ratio <= 1.10 else "NOT met") + ")"
            print(f"{name:9} step latency redundancy={k} / redundancy=1: {ratio:.2f}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
