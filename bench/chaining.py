"""Chained vs client-driven decode steps under WAN latency (issue 14), in one run.

    python bench/chaining.py [--rounds 3] [--steps 12] [--delay-ms 100] [--mbit 100]

Three `node start --threads 1` servers of SmolLM2-135M (blocks 0:10, 10:20, 20:30), each
behind its own relay (trustswarm/testing/relay.py: half the RTT each way, the given
bandwidth per direction) and announcing only the relay's address, so every byte between
any two of client and servers crosses a relay (servers that dial each other by announced
address too), so chaining turns a step's 6 one-way trips into 4: at zero compute it gains
at most 1.5x plus the client's own per-hop overhead here. Servers near each other (one
region) with a far client would show the full "3 RTTs -> 1"; that needs per-host delay
(tc netem), which this machine's kernel lacks. Two clients on the same servers: one with
`chaining=True` (a step goes client -> s1 -> s2 -> s3, each answering the client), one
with `chaining=False` (client -> s1 -> client -> s2 -> ...). Rounds alternate between
them; each round is one greedy generate after a 16-token prefix, the decode steps timed
in windows of `--steps` (bench/table_measure.py), the prefill not. Prints decode steps/s
and their ratio next to the load average; writes bench/results/chaining.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from table_measure import inference_steps_per_s, token_ids
from table_swarm import Servers

from trustswarm.testing.relay import mbit

SPANS = ["0:10", "10:20", "20:30"]
RESULTS = Path(__file__).resolve().parent / "results"


def measure(models: dict, rounds: int, steps: int, vocab: int) -> dict[str, list[float]]:
    """Per variant, the steps/s of every window of every round (variants alternate)."""
    out: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name, model in models.items():
            out[name] += inference_steps_per_s(model, 16, steps, 2, vocab, seed=r)
        print(
            f"round {r + 1}: "
            + ", ".join(f"{n} {statistics.median(v):.2f} steps/s" for n, v in out.items()),
            flush=True,
        )
    return out


def report(results: dict[str, list[float]], args: argparse.Namespace, meta: dict) -> str:
    chained = statistics.median(results["chained"])
    hops = statistics.median(results["hops"])
    return "\n".join(
        [
            "# Chained vs client-driven decode steps under WAN latency (bench/chaining.py)",
            "",
            f"Measured {meta['started']} UTC on {os.cpu_count()} cores, load average "
            f"{meta['load_before']:.2f} before and {meta['load_after']:.2f} after; SmolLM2-135M "
            f"float32, 3 servers (0:10, 10:20, 20:30, `--threads 1`) each behind a relay of "
            f"{args.delay_ms:g} ms RTT and {args.mbit:g} Mbit/s; greedy decode after a 16-token "
            f"prefix, {args.rounds} rounds x 2 windows of {args.steps} steps per variant.",
            "",
            "| variant | decode steps/s (median) | min - max | ms per step |",
            "| --- | --- | --- | --- |",
            *(
                f"| {name} | {statistics.median(v):.2f} | {min(v):.2f} - {max(v):.2f} | "
                f"{1000 / statistics.median(v):.0f} |"
                for name, v in results.items()
            ),
            "",
            f"**chained / client-driven = {chained / hops:.2f}x** (goal: >= 2x). Greedy tokens "
            f"equal between the variants: {meta['same_tokens']}.",
            "",
        ]
    )


def main() -> int:
    from trustswarm.client import DistributedModelForCausalLM
    from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--delay-ms", type=float, default=100.0, help="simulated RTT")
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.delay_ms < 0 or args.mbit <= 0:
        parser.error("--rounds/--steps >= 1, --delay-ms >= 0, --mbit > 0")
    ensure_model(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="ts-chaining-"))
    link = (args.delay_ms / 2000, mbit(args.mbit))
    meta: dict = {"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    meta["load_before"] = os.getloadavg()[0]
    with Servers(args.model_dir, work, list(SPANS), wan=link) as servers:
        models = {
            name: DistributedModelForCausalLM.from_pretrained(
                args.model_dir, servers.client_peers, chaining=name == "chained"
            )
            for name in ("chained", "hops")
        }
        try:
            vocab = models["chained"].config.vocab_size
            tokens = {}
            for name, model in models.items():  # warm-up, and the greedy tokens to compare
                prompt = token_ids(1, 16, vocab, seed=99)
                out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=[])
                tokens[name] = out.tolist()
            meta["same_tokens"] = tokens["chained"] == tokens["hops"]
            results = measure(models, args.rounds, args.steps, vocab)
        finally:
            for model in models.values():
                model.close()
    meta["load_after"] = os.getloadavg()[0]
    text = report(results, args, meta)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaining.md").write_text(text)
    (args.out / "chaining.json").write_text(json.dumps({"meta": meta, "steps_per_s": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
