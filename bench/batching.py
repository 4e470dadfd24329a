"""Batching across clients (issue 14), in one run: `python bench/batching.py`.

    python bench/batching.py [--model-dir DIR | --tiny] [--clients 8] [--prefix 32]
                             [--steps 16] [--repeats 2] [--sections rounding,compute,swarm]

Sections (all on this machine, SmolLM2-135M-Instruct unless --tiny):

  rounding  one server's span, --clients sessions with prompts of different lengths, then
            --steps decode steps batched vs the same steps run one by one: the comparator's
            worst per-token error and its verdict, float32 and bfloat16
  compute   the same span in process, no network: decode steps/s of 1 session alone and
            of --clients concurrent sessions through the server's step queue
            (node/step_batcher.py), batching on vs off
  swarm     3 `node start --threads 1` servers on loopback (as bench/table.py), batching on
            (default) vs off (`--no-batching`); 1 client process, then --clients client
            processes at once (bench/table_client.py): decode steps/s after a --prefix
            token prompt, per client and aggregate (medians of --repeats windows)

Timing figures need a quiet machine (nothing else running); the smoke run is
`python bench/batching.py --tiny --clients 2 --steps 2 --repeats 1`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import trio
from table_measure import Workload  # noqa: E402
from table_swarm import PY, ClientWorkers, Servers  # noqa: E402

from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model  # noqa: E402
from trustswarm.models.batched_step import StepRequest, run_steps  # noqa: E402
from trustswarm.models.runner import BlockRunner  # noqa: E402
from trustswarm.models.store import ModelDir  # noqa: E402
from trustswarm.node.step_batcher import StepBatcher  # noqa: E402
from trustswarm.protocol.comparator import compare  # noqa: E402

SECTIONS = ("rounding", "compute", "swarm")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _prefilled(runner: BlockRunner, sessions: int, prefix: int, seed: int) -> list:
    """`sessions` caches after prompts of prefix, prefix + 3, prefix + 6, ... tokens."""
    g = torch.Generator().manual_seed(seed)
    caches = []
    for i in range(sessions):
        cache = runner.new_cache(1, prefix + 3 * sessions + 512)
        runner.step(cache, torch.randn(1, prefix + 3 * i, runner.hidden_size, generator=g))
        caches.append(cache)
    return caches


def rounding(model_dir: ModelDir, span: tuple[int, int], args: argparse.Namespace) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        runner = BlockRunner(model_dir, *span, dtype)
        alone = _prefilled(runner, args.clients, args.prefix, 0)
        together = _prefilled(runner, args.clients, args.prefix, 0)
        g = torch.Generator().manual_seed(1)
        worst, rejected = 0.0, 0
        for _ in range(args.steps):
            hidden = [torch.randn(1, 1, runner.hidden_size, generator=g) for _ in alone]
            expected = [runner.step(c, h) for c, h in zip(alone, hidden, strict=True)]
            requests = [StepRequest(c, h) for c, h in zip(together, hidden, strict=True)]
            for exp, got in zip(expected, run_steps(runner, requests), strict=True):
                verdict = compare(got, exp)
                worst = max(worst, verdict.worst_token_error)
                rejected += not verdict.agree
        total = args.steps * args.clients
        log(
            f"rounding {str(dtype).removeprefix('torch.')} blocks {span[0]}:{span[1]}: "
            f"worst per-token error batched vs alone {worst:.2e}, "
            f"{rejected}/{total} steps the comparator would reject"
        )


def _steps_per_s(runner: BlockRunner, sessions: int, args: argparse.Namespace, on: bool) -> float:
    caches = _prefilled(runner, sessions, args.prefix, 2)
    batcher = StepBatcher(runner, trio.CapacityLimiter(1))
    if not on:
        batcher.limits = type(batcher.limits)(max_steps=1)

    async def client(cache) -> None:
        for _ in range(args.steps):
            await batcher.step(StepRequest(cache, torch.randn(1, 1, runner.hidden_size)))

    async def main() -> float:
        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for cache in caches:
                nursery.start_soon(client, cache)
        return sessions * args.steps / (time.perf_counter() - began)

    return trio.run(main)


def compute(model_dir: ModelDir, span: tuple[int, int], args: argparse.Namespace) -> None:
    runner = BlockRunner(model_dir, *span)
    _steps_per_s(runner, 2, argparse.Namespace(prefix=args.prefix, steps=2), True)  # warm-up
    for on in (True, False):
        rates = {n: [] for n in (1, args.clients)}
        for _ in range(args.repeats):
            for n in rates:
                rates[n].append(_steps_per_s(runner, n, args, on))
        one, many = (statistics.median(rates[n]) for n in (1, args.clients))
        log(
            f"compute, batching {'on ' if on else 'off'} blocks {span[0]}:{span[1]}: 1 session "
            f"{one:.1f} steps/s, {args.clients} sessions {many:.1f} steps/s aggregate "
            f"({many / one:.2f}x)"
        )


@dataclass
class _Servers(Servers):
    """table_swarm.Servers whose `node start` commands get `extra` arguments."""

    extra: tuple[str, ...] = ()

    def _spawn(self, i: int, initial: list[str]) -> None:
        cmd = [*PY, "node", "start", "--model", str(self.model_dir), "--blocks", self.spans[i]]
        cmd += ["--identity", str(self.work / f"node{i}.key"), "--listen", self._listen[i]]
        cmd += ["--threads", "1", "--log-level", "WARNING", *self.extra]
        cmd += ["--initial-peers", *initial] if initial else ["--new-swarm"]
        log_path = self.work / f"node{i}.log"
        self.procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True)
        )
        self._logs.append(log_path)


def swarm(model_dir: Path, spans: list[str], args: argparse.Namespace, work: Path) -> None:
    workload = Workload(short_prefix=args.prefix, steps=args.steps, repeats=args.repeats)
    spec = {"workload": asdict(workload), "request_timeout": 300.0}
    results: dict[tuple[bool, int], tuple[float, float]] = {}
    for on in (True, False):
        extra = () if on else ("--no-batching",)
        servers = _Servers(model_dir, work / f"servers-{on}", list(spans), extra=extra)
        with servers:
            for n in (1, args.clients):
                workers = ClientWorkers(
                    n, model_dir, servers.client_peers, spec, work / f"clients-{on}-{n}"
                )
                try:
                    values, aggregate, _ = workers.run("inf_short", seed=n)
                finally:
                    workers.close()
                per = statistics.median(v for client in values for v in client)
                results[on, n] = (per, statistics.median(aggregate))
                log(
                    f"swarm, batching {'on ' if on else 'off'}: {n} client(s): "
                    f"per client {per:.2f} steps/s, aggregate {results[on, n][1]:.2f} steps/s"
                )
    print()
    print(f"| batching | 1 client steps/s | {args.clients} clients aggregate | ratio |")
    print("| --- | --- | --- | --- |")
    for on in (True, False):
        one, many = results[on, 1][1], results[on, args.clients][1]
        print(f"| {'on' if on else 'off'} | {one:.2f} | {many:.2f} | {many / one:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--tiny", action="store_true", help="the 6-block test model (smoke)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; have {', '.join(SECTIONS)}")
    work = Path(tempfile.mkdtemp(prefix="trustswarm-batching-"))
    if args.tiny:
        from trustswarm.testing.tiny_model import make_tiny_model_dir

        path, spans = make_tiny_model_dir(work / "tiny"), ["0:2", "2:4", "4:6"]
    else:
        ensure_model(args.model_dir)
        path, spans = args.model_dir, ["0:10", "10:20", "20:30"]
    model_dir = ModelDir.open(path)
    first = tuple(int(x) for x in spans[0].split(":"))
    log(f"{path}, {args.clients} clients, {args.prefix}-token prefix, {args.steps} steps")
    if "rounding" in sections:
        rounding(model_dir, first, args)
    if "compute" in sections:
        compute(model_dir, first, args)
    if "swarm" in sections:
        swarm(path, spans, args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
