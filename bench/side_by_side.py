"""trustswarm vs Petals, side by side in one run (issue 14's table row).

    python bench/side_by_side.py [--rounds 2] [--reps 5] [--new-tokens 64]
                                 [--petals ../shared/petals-baseline] [--variants chained,hops]

Both swarms serve SmolLM2-135M-Instruct in float32 on blocks 0:10 / 10:20 / 20:30 of three
servers on loopback, torch's default thread count (Petals' servers use it too). The
Petals swarm runs in its own network namespace (../shared/petals-baseline/run_swarm.sh);
its client (bench_client.py there) times its swarm and a local HF model in its own
process. Our servers are `trustswarm node start` processes; the local HF model and our
client run in this process. Rounds alternate: Petals (its `--reps` swarm + local pairs),
then ours (`--reps` of local, then each client variant), so load from outside hits both.

Each figure: chat prompt "What is the capital of France?", greedy, exactly N new
tokens, tokens/s over the whole generate call (prefill and session open included),
median over the round's repeats. The ratio that compares the systems fairly is each
swarm's tokens/s over the local model's *in the same process and round*, then ours over
Petals'. Writes bench/results/side_by_side.{md,json}.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from generation import CpuWatch, Swarm, load_local_model, run_local, run_swarm

PROMPT = "What is the capital of France?"
HERE = Path(__file__).resolve().parent
DEFAULT_PETALS = HERE.parent.parent / "shared" / "petals-baseline"
RESULTS = HERE / "results"


def petals_ready(petals: Path) -> str | None:
    """Why the Petals row cannot run, or None when it can."""
    venv = Path(os.environ.get("PETALS_VENV", "/tmp/petals2"))
    model = Path(os.environ.get("PETALS_MODEL_DIR", "/tmp/smollm2-hf"))
    if not (petals / "bench_client.py").is_file():
        return f"no Petals baseline at {petals}"
    if not (venv / "bin" / "python").exists():
        return f"Petals venv {venv} missing: run `bash {petals}/setup.sh`"
    if not (model / "config.json").is_file():
        return f"converted model {model} missing: run `python3 {petals}/convert.py`"
    return None


def run_petals_round(petals: Path, reps: int, new_tokens: int) -> dict:
    """One Petals client process: `reps` (swarm, local) pairs; its bench_result.json."""
    state = Path(os.environ.get("PETALS_STATE_DIR", "/tmp/petals-anchor"))
    result = state / "bench_result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(petals / "bench_client.py"), "--reps", str(reps)]
    cmd += ["--new-tokens", str(new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    if proc.returncode not in (0, 1) or not result.is_file():
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise SystemExit(f"Petals client failed (rc {proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


def start_petals(petals: Path) -> None:
    proc = subprocess.run(
        ["bash", str(petals / "run_swarm.sh")], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise SystemExit(f"Petals swarm failed to start:\n{(proc.stdout + proc.stderr)[-2000:]}")


def stop_petals(petals: Path) -> None:
    subprocess.run(["bash", str(petals / "stop.sh")], capture_output=True, timeout=300)


def our_clients(model_dir: Path, addrs: list[str], variants: list[str]) -> dict[str, object]:
    from trustswarm.client import DistributedModelForCausalLM

    can_chain = "chaining" in inspect.signature(DistributedModelForCausalLM.from_pretrained).parameters
    models: dict[str, object] = {}
    for variant in variants:
        if variant not in ("chained", "hops"):
            raise SystemExit(f"unknown variant {variant!r}: chained or hops")
        if not can_chain and variant == "chained":
            print("this trustswarm has no chaining option: variant 'chained' skipped")
            continue
        kwargs = {"chaining": variant == "chained"} if can_chain else {}
        models[variant] = DistributedModelForCausalLM.from_pretrained(model_dir, addrs, **kwargs)
    return models


def run_ours_round(local, models: dict, ids, n: int, reps: int, pids: list[int]) -> dict:
    """`reps` x (local, every variant); tokens/s medians, tokens, other processes' CPU."""
    runs: dict[str, list[float]] = {"local": [], **{v: [] for v in models}}
    tokens: dict[str, list[int]] = {}
    foreign: list[float] = []
    for _ in range(reps):
        with CpuWatch(pids) as cpu:
            seconds, tokens["local"], _steps = run_local(local, ids, n)
            runs["local"].append(n / seconds)
            for name, model in models.items():
                seconds, tokens[name] = run_swarm(model, ids, n)
                runs[name].append(n / seconds)
        foreign.append(cpu.foreign_cores)
    return {
        "tok_s": {k: statistics.median(v) for k, v in runs.items()},
        "all_tok_s": runs,
        "same_tokens": {k: tokens[k] == tokens["local"] for k in models},
        "foreign_cores": max(foreign),
        "load_average": os.getloadavg()[0],
    }


def report(rounds: list[dict], args: argparse.Namespace, started: str) -> str:
    lines = [
        "# trustswarm vs Petals, side by side (bench/side_by_side.py)",
        "",
        f"Measured {started} UTC, {os.cpu_count()} cores; SmolLM2-135M-Instruct float32, "
        f"blocks 0:10 / 10:20 / 20:30 on loopback, prompt {PROMPT!r} (chat template), greedy, "
        f"exactly {args.new_tokens} new tokens, tokens/s over the whole generate call, median "
        f"of {args.reps} per round. Ratios: each swarm over the local HF model of the same "
        "process and round; 'vs Petals' = our swarm/local over Petals' swarm/local.",
        "",
        "| round | system | swarm tok/s | local tok/s | swarm / local | vs Petals | "
        "greedy = local | load avg | other CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(rounds, start=1):
        p = r.get("petals")
        p_ratio = p["ratio"]["median"] if p else None
        if p:
            lines.append(
                f"| {i} | Petals {p['petals']} | {p['swarm_tok_s']['median']:.2f} | "
                f"{p['local_tok_s']['median']:.2f} | {p_ratio:.3f} | 1 | "
                f"{'yes' if p['tokens_identical'] else 'no'} | {r['petals_load']:.2f} | - |"
            )
        ours = r["ours"]
        local = ours["tok_s"]["local"]
        for name, tps in ours["tok_s"].items():
            if name == "local":
                continue
            vs = f"{(tps / local) / p_ratio:.2f}" if p_ratio else "-"
            same = "yes" if ours["same_tokens"][name] else "no"
            lines.append(
                f"| {i} | trustswarm ({name}) | {tps:.2f} | {local:.2f} | {tps / local:.3f} | "
                f"{vs} | {same} | {ours['load_average']:.2f} | {ours['foreign_cores']:.2f} |"
            )
    lines += [
        "",
        "'chained': decode steps pass server to server (the default at redundancy=1); "
        "'hops': the client sends each step to each server in turn. 'other CPU': cores' worth "
        "used by processes outside our client and servers while ours ran (the idle Petals "
        "swarm included).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--petals", type=Path, default=DEFAULT_PETALS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="chained,hops")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.rounds < 1 or args.reps < 1 or args.new_tokens < 1:
        parser.error("--rounds, --reps and --new-tokens must be >= 1")

    ensure_model(args.model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    why_not = petals_ready(args.petals)
    if why_not:
        print(f"Petals row skipped: {why_not}")
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    swarm = Swarm("side-by-side", args.model_dir, None, Path(tempfile.mkdtemp(prefix="ts-sbs-")))
    models: dict[str, object] = {}
    rounds: list[dict] = []
    try:
        if not why_not:
            start_petals(args.petals)
        swarm.start_first()
        swarm.start_rest()
        local = load_local_model(args.model_dir)
        models = our_clients(args.model_dir, swarm.addrs, args.variants.split(","))
        run_ours_round(local, models, ids, args.new_tokens, 1, [])  # warm-up
        for i in range(args.rounds):
            entry: dict = {}
            if not why_not:
                entry["petals"] = run_petals_round(args.petals, args.reps, args.new_tokens)
                entry["petals_load"] = os.getloadavg()[0]
            pids = [os.getpid(), *swarm.pids]
            entry["ours"] = run_ours_round(local, models, ids, args.new_tokens, args.reps, pids)
            rounds.append(entry)
            print(f"round {i + 1}: {json.dumps(entry['ours']['tok_s'])}", flush=True)
    finally:
        for model in models.values():
            model.close()
        swarm.stop()
        if not why_not:
            stop_petals(args.petals)
    text = report(rounds, args, started)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "side_by_side.md").write_text(text)
    (args.out / "side_by_side.json").write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
