"""Training benchmark: forward+backward tokens/s, 3-server local swarm vs. local autograd.

    python bench/training.py [--batches 1,8] [--seq-len 64] [--repeats 3]

One run, with the real SmolLM2-135M-Instruct (imported once, like `make demo`):

* LOCAL: the model directory's own weights in a plain `LlamaForCausalLM` (bit-identical
  to what the servers load), float32, weights frozen; one step = forward of
  `inputs_embeds` (requires grad) + LM head + cross-entropy, then `loss.backward()`
  (gradients w.r.t. the inputs only, as the swarm computes);
* SWARM: 3 `trustswarm node start --threads 1` processes on 127.0.0.1 (blocks 0:10,
  10:20, 20:30, as demo.py) and a `DistributedModelForCausalLM`, the same step: the
  forward goes through the servers, the backward goes back through them (each server
  recomputes its blocks' forward from the inputs, then returns signed input gradients);
* for each batch size: one warm-up each, then `--repeats` interleaved repeats (local,
  swarm, local, ...), median tokens/s (batch * seq_len per step), ratio swarm/local;
  the gradients of both sides are compared (max |diff| / max |grad|) as a sanity check;
* "foreign CPU": cores' worth of CPU other processes used during the timed steps (the
  machine is shared); before each repeat the bench waits up to `--quiet-wait` s for quiet.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from generation import CpuWatch, load_local_model, wait_for_quiet  # noqa: E402

BLOCK_SPANS = ("0:10", "10:20", "20:30")


def step(model, embeds, ids, swarm: bool):  # noqa: ANN001, ANN201
    """One forward+backward; returns (seconds, loss, input gradient)."""
    x = embeds.detach().clone().requires_grad_(True)
    began = time.perf_counter()
    if swarm:
        loss = model(inputs_embeds=x, labels=ids).loss
    else:
        loss = model(inputs_embeds=x, labels=ids, use_cache=False).loss
    loss.backward()
    return time.perf_counter() - began, loss.item(), x.grad


def start_swarm(model_dir: Path, work: Path) -> tuple[list[subprocess.Popen], list[str]]:
    from trustswarm.demo import start_node

    procs, addrs = [], []
    for i, blocks in enumerate(BLOCK_SPANS):
        proc, addr = start_node(
            model_dir, blocks, work / f"node{i}.key", addrs[:1], work / f"node{i}.log"
        )
        procs.append(proc)
        addrs.append(addr)
    return procs, addrs


def main() -> int:
    from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model, stop_processes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument(
        "--local-threads",
        default="1,default",
        help="comma list of torch thread counts for the local side ('default': torch's)",
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    local_threads = [
        None if t.strip() == "default" else int(t) for t in args.local_threads.split(",")
    ]
    if args.seq_len < 2 or args.repeats < 1 or min(batches) < 1:
        parser.error("--seq-len >= 2, --repeats >= 1 and batch sizes >= 1")

    ensure_model(args.model_dir)
    import torch
    from transformers.utils import logging as hf_logging

    from trustswarm.client import DistributedModelForCausalLM

    hf_logging.set_verbosity_error()
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"torch default threads {torch.get_num_threads()}, servers --threads 1, "
        f"load avg {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="trustswarm-bench-training-"))
    procs: list[subprocess.Popen] = []
    try:
        t = time.perf_counter()
        procs, addrs = start_swarm(args.model_dir, work)
        print(f"started 3 servers in {time.perf_counter() - t:.1f} s", flush=True)
        local = load_local_model(args.model_dir).requires_grad_(False)
        own = [os.getpid(), *(p.pid for p in procs)]
        default_threads = torch.get_num_threads()
        variants = [(f"local {t or default_threads}t", t or default_threads) for t in local_threads]
        results: list[dict] = []
        with DistributedModelForCausalLM.from_pretrained(
            args.model_dir, addrs, request_timeout=120
        ) as remote:
            vocab = remote.config.vocab_size
            for batch in batches:
                tokens = batch * args.seq_len
                gen = torch.Generator().manual_seed(batch)
                ids = torch.randint(0, vocab, (batch, args.seq_len), generator=gen)
                with torch.no_grad():
                    embeds = remote.get_input_embeddings()(ids)
                times: dict[str, list[float]] = {name: [] for name, _ in variants}
                times["swarm"] = []
                foreign: list[float] = []
                out: dict[str, tuple[float, torch.Tensor]] = {}
                for r in range(-1, args.repeats):  # repeat -1: warm-up, not timed
                    if r >= 0:
                        wait_for_quiet(own, args.quiet_wait)
                    line = []
                    for name, threads in [*variants, ("swarm", default_threads)]:
                        torch.set_num_threads(threads)
                        model = remote if name == "swarm" else local
                        with CpuWatch(own) as cpu:
                            seconds, loss, grad = step(model, embeds, ids, swarm=name == "swarm")
                        out[name] = (loss, grad)
                        if r >= 0:
                            times[name].append(seconds)
                            foreign.append(cpu.foreign_cores)
                            line.append(f"{name} {tokens / seconds:6.1f}")
                    torch.set_num_threads(default_threads)
                    if r >= 0:
                        print(
                            f"batch {batch} repeat {r + 1}: " + ", ".join(line) + " tok/s "
                            f"(foreign CPU up to {max(foreign[-len(line) :]):.2f} cores)",
                            flush=True,
                        )
                grad_l, grad_s = out[variants[-1][0]][1], out["swarm"][1]
                results.append(
                    {
                        "batch": batch,
                        "tps": {k: tokens / statistics.median(v) for k, v in times.items()},
                        "grad_diff": float((grad_s - grad_l).abs().max() / grad_l.abs().max()),
                        "foreign": max(foreign),
                    }
                )
        print(f"\nforward+backward tokens/s, seq_len {args.seq_len}, median of {args.repeats}:")
        names = [name for name, _ in variants]
        head = " | ".join(f"{n} tok/s | swarm/{n}" for n in names)
        print(f"| batch | swarm tok/s | {head} | grad diff / max | max foreign CPU |")
        print("|" + " --- |" * (4 + 2 * len(names)))
        for row in results:
            tps = row["tps"]
            cells = " | ".join(f"{tps[n]:.1f} | {tps['swarm'] / tps[n]:.2f}" for n in names)
            print(
                f"| {row['batch']} | {tps['swarm']:.1f} | {cells} | {row['grad_diff']:.1e} | "
                f"{row['foreign']:.2f} |"
            )
    finally:
        stop_processes(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
