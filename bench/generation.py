"""Generation benchmark: local Hugging Face model vs. a 3-server local swarm.

    python bench/generation.py [--repeats 3] [--new-tokens 64] [--server-threads 1,default]
        [--chaining on|off|both] [--wan-delay-ms 100 --wan-mbit 100] [--profile]

One run does, with the real SmolLM2-135M-Instruct (imported once, like `make demo`):

* LOCAL: the same weights assembled into a plain `LlamaForCausalLM` (blocks and client
  parts of the model directory, i.e. bit-identical to what the swarm serves), greedy
  `generate` of exactly N new tokens (`eos_token_id=[]`, see README), after a warm-up;
* SWARM: for each `--server-threads` setting, 3 `trustswarm node start` processes
  (blocks 0:10, 10:20, 20:30 on 127.0.0.1, as demo.py) and a `DistributedModelForCausalLM`
  generating exactly N tokens greedily (`eos_token_id=[]`: it never stops early);
* repeats are interleaved (local, swarm A, swarm B, local, ...) so that load from other
  processes hits every variant alike; the median tokens/s is reported, the CPU time other
  processes took during the timed runs is printed so a noisy run can be recognised;
* per-step wall times from a logits processor on both sides (prefill = the first step,
  decode = the mean of the others), uninstrumented;
* with `--profile`: where a step's time goes, on the client (embedding + LM head, codec,
  signature checks, digests, stream writes, waiting for answers) and on each server
  (codec, digests, signing, thread hop, the runner's own overhead, each block), in ms per
  decode and prefill step (trustswarm.testing.step_profile patches the processes, the
  servers run under its wrapper; bench/generation_profile.py prints the report). Instrumented runs are slower: take tokens/s from a run without it.

Smoke run (tiny settings, no timing claims): `--new-tokens 4 --repeats 1
--server-threads 1 --quiet-wait 0 --profile`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from generation_profile import print_profile

from trustswarm.testing.step_profile import ClientProfile, Tally

BLOCK_SPANS = ("0:10", "10:20", "20:30")
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting: how much of the machine did other processes take? -------------------


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def _proc_jiffies(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            total += int(parts[11]) + int(parts[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def wait_for_quiet(pids: list[int], max_wait: float, threshold: float = 0.25) -> float:
    """Sleep until processes other than `pids` use < threshold cores (or max_wait passes)."""
    deadline = time.monotonic() + max_wait
    while True:
        with CpuWatch(pids) as watch:
            time.sleep(1.0)
        if watch.foreign_cores < threshold or time.monotonic() >= deadline:
            if watch.foreign_cores >= threshold:
                print(f"  (machine still busy: {watch.foreign_cores:.2f} cores used by others)")
            return watch.foreign_cores


class CpuWatch:
    """Cores' worth of CPU used by processes other than `pids` during a `with` block."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.foreign_cores = 0.0
        self.own_cores = 0.0

    def __enter__(self) -> CpuWatch:
        self._t = time.monotonic()
        self._busy = _busy_jiffies()
        self._own = _proc_jiffies(self.pids)
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = max(time.monotonic() - self._t, 1e-6)
        busy = _busy_jiffies() - self._busy
        own = _proc_jiffies(self.pids) - self._own
        self.own_cores = own / _CLK_TCK / seconds
        self.foreign_cores = max(busy - own, 0) / _CLK_TCK / seconds


# -- swarm processes --------------------------------------------------------------------


class Swarm:
    """Three block servers on loopback, blocks 0:10, 10:20, 20:30 (profiled with
    `profile`: they run under trustswarm.testing.step_profile and write its tallies)."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        threads: int | None,
        work: Path,
        wan: tuple[float, float] | None = None,
        profile: bool = False,
    ) -> None:
        self.name = name
        self.profile = profile
        self.wan = wan  # (one-way delay s, bytes/s): every server behind its own relay
        self.relay = None
        self.listen = ["/ip4/127.0.0.1/tcp/0"] * len(BLOCK_SPANS)
        self.announce: list[str | None] = [None] * len(BLOCK_SPANS)
        self.model_dir = model_dir
        self.threads = threads
        self.work = work / name
        self.work.mkdir(parents=True)
        self.procs: list[subprocess.Popen] = []
        self.addrs: list[str] = []
        self.tally_files = [self.work / f"node{i}.tally.json" for i in range(len(BLOCK_SPANS))]

    def _spawn(self, i: int, initial: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "trustswarm"]
        if self.profile:
            module = "trustswarm.testing.step_profile"
            cmd = [sys.executable, "-m", module, str(self.tally_files[i])]
        cmd += ["node", "start", "--model", str(self.model_dir), "--blocks", BLOCK_SPANS[i]]
        cmd += ["--identity", str(self.work / f"node{i}.key")]
        cmd += ["--listen", self.listen[i], "--log-level", "WARNING"]
        if self.announce[i]:
            cmd += ["--announce-addr", self.announce[i]]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        cmd += ["--initial-peers", *initial] if initial else ["--new-swarm"]
        log = (self.work / f"node{i}.log").open("w")
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)

    def _address_of(self, i: int, proc: subprocess.Popen) -> str:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("/ip4/"):
                return line.strip()
            if proc.poll() is not None:
                break
        raise SystemExit(f"{self.name}: node {i} failed to start; see {self.work}/node{i}.log")

    def start_first(self) -> None:
        if self.wan:
            from table_swarm import free_ports

            from trustswarm.testing.relay import RelayProcess

            n = len(BLOCK_SPANS)
            ports = free_ports(2 * n)
            self.listen = [f"/ip4/127.0.0.1/tcp/{p}" for p in ports[:n]]
            self.announce = [f"/ip4/127.0.0.1/tcp/{p}" for p in ports[n:]]
            targets = [("127.0.0.1", p) for p in ports[:n]]
            self.relay = RelayProcess(targets, *self.wan, listen_ports=ports[n:]).__enter__()
        self.procs.append(self._spawn(0, []))
        self.addrs.append(self._address_of(0, self.procs[0]))

    def start_rest(self) -> None:
        rest = [self._spawn(i, self.addrs[:1]) for i in range(1, len(BLOCK_SPANS))]
        self.procs += rest
        self.addrs += [self._address_of(i, p) for i, p in enumerate(rest, start=1)]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def client_peers(self) -> list[str]:
        """Where clients join: the first server, through its relay when there is one."""
        if not self.announce[0]:
            return self.addrs[:1]
        return [f"{self.announce[0]}/p2p/{self.addrs[0].split('/p2p/')[1]}"]

    def stop(self) -> list[tuple[str, Tally]]:
        """Stop the servers (SIGTERM: profiled ones write their tallies) and return the
        tallies, named by server and span."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.relay is not None:
            self.relay.__exit__(None, None, None)
            self.relay = None
        return [
            (f"server {i} (blocks {BLOCK_SPANS[i]})", Tally.from_json(json.loads(path.read_text())))
            for i, path in enumerate(self.tally_files)
            if path.is_file()
        ]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One client configuration on one swarm."""

    swarm: Swarm
    chaining: bool
    labelled: bool  # both chaining settings run: say which in the name

    @property
    def name(self) -> str:
        if not self.labelled:
            return self.swarm.name
        return f"{self.swarm.name}/{'chained' if self.chaining else 'hops'}"


# -- the two sides ----------------------------------------------------------------------


def load_local_model(model_dir: Path):
    """A plain HF LlamaForCausalLM holding exactly the model directory's weights."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from trustswarm.models.store import ModelDir

    directory = ModelDir.open(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(directory.config, dtype=torch.float32)
    parts = directory.load_client_parts(torch.float32)
    model.model.layers = nn.ModuleList(directory.load_blocks(0, directory.num_blocks))
    model.model.embed_tokens = parts.embed_tokens
    model.model.norm = parts.norm
    model.lm_head = parts.lm_head
    model.model.rotary_emb = directory.load_rotary()
    model.eval()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise SystemExit(f"local model has unloaded tensors: {left}")
    return model


class StepClock:
    """A logits processor that only records when each generation step reached it."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_local(model, ids, new_tokens: int) -> tuple[float, list[int], list[float]]:
    import torch
    from transformers import LogitsProcessorList

    clock = StepClock()
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            eos_token_id=[],  # never stop, never mask EOS: the same rule as the swarm's
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
    seconds = time.perf_counter() - began
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise SystemExit(
            f"local generate made {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}"
        )
    # Step times: prefill = first clock tick since start, then tick-to-tick.
    steps = [clock.times[0] - began] + [b - a for a, b in itertools.pairwise(clock.times)]
    return seconds, out[0, ids.shape[1] :].tolist(), steps


def run_swarm(model, ids, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds and new tokens of one greedy generation (bench/side_by_side.py uses it)."""
    seconds, tokens, _steps = run_swarm_steps(model, ids, new_tokens)
    return seconds, tokens


def run_swarm_steps(model, ids, new_tokens: int) -> tuple[float, list[int], list[float]]:
    """run_swarm, and each step's wall time (prefill first) from a logits processor."""
    from transformers import LogitsProcessorList

    clock = StepClock()
    began = time.perf_counter()
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=[],
        logits_processor=LogitsProcessorList([clock]),
    )
    seconds = time.perf_counter() - began
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise SystemExit(
            f"swarm generate made {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}"
        )
    steps = [clock.times[0] - began] + [b - a for a, b in itertools.pairwise(clock.times)]
    return seconds, out[0, ids.shape[1] :].tolist(), steps


# -- analysis ---------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


# -- optional py-spy phase (after the timed runs, so it cannot distort them) ----------------

SPY_CATEGORIES = [
    ("torch: blocks (runner)", ["models/runner.py"]),
    ("torch: head/embed", ["logits_of", "(torch/nn/modules/sparse.py"]),
    ("sign / verify / digests", ["statement.py", "identity.py", "digests.py", "nacl/"]),
    ("codec (safetensors msg)", ["protocol/codec.py"]),
    ("noise (encryption)", ["security/noise", "security/secure_session", "/crypto/"]),
    ("yamux", ["stream_muxer/yamux"]),
    ("libp2p other", ["libp2p/"]),
    ("trio thread hop", ["trio/_threads.py", "trio/_core/_thread_cache.py"]),
    ("trio scheduler / epoll", ["trio/_core", "trio/_socket", "trio/_highlevel"]),
]


IDLE_LEAVES = ("EpollIOManager.get_events", "WorkerThread._work", "Condition.wait", "Event.wait")


def pyspy_phase(
    pyspy: str, out_dir: Path, model, pids: dict[str, int], ids, n: int, seconds: float
) -> None:
    """Sample client and servers with py-spy while generating; print ms/token by category."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = 200
    spies = [
        subprocess.Popen(
            [pyspy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
            + ["--nonblocking", "--duration", str(int(seconds) + 2)]
            + ["-o", str(out_dir / f"{name}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    time.sleep(1.0)
    began, tokens = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        tokens += len(run_swarm(model, ids, n)[1])
    tps = tokens / (time.perf_counter() - began)
    for spy in spies:
        spy.wait(timeout=120)
    print(f"\n--- py-spy ({rate} Hz, all active threads; {tps:.2f} tok/s while sampled) ---")
    print("ms of active-thread time per generated token, by the first matching category:")
    names = list(pids)
    totals: dict[str, dict[str, float]] = {}
    for name in names:
        path = out_dir / f"{name}.txt"
        counts: dict[str, float] = defaultdict(float)
        if path.is_file():
            for line in path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if stack.rsplit(";", 1)[-1].startswith(IDLE_LEAVES):
                    continue  # blocked in epoll_wait / a lock: py-spy cannot always tell
                category = next(
                    (c for c, keys in SPY_CATEGORIES if any(k in stack for k in keys)), "other"
                )
                counts[category] += int(count) * 1000 / rate / max(tokens, 1)
        totals[name] = counts
    print(f"{'category':<28}" + "".join(f"{name:>10}" for name in names))
    for category in [c for c, _ in SPY_CATEGORIES] + ["other"]:
        print(f"{category:<28}" + "".join(f"{totals[name][category]:10.2f}" for name in names))
    print(f"{'total':<28}" + "".join(f"{sum(totals[name].values()):10.2f}" for name in names))
    print(f"(raw collapsed stacks in {out_dir}; e.g. flamegraph.pl or speedscope)")


# -- main -------------------------------------------------------------------------------


def parse_threads(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        out.append(None if part in ("default", "0", "") else int(part))
    return out


def main() -> int:
    from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--server-threads",
        default="1,default",
        help="comma list of server --threads settings to compare; 'default' = torch's choice",
    )
    parser.add_argument(
        "--chaining",
        choices=["on", "off", "both"],
        default="on",
        help="decode steps server to server (the client's default), client-driven, or both "
        "(two clients per swarm, alternating)",
    )
    parser.add_argument(
        "--wan-delay-ms",
        type=float,
        default=0.0,
        help="simulated RTT: every server behind its own relay (0: plain loopback)",
    )
    parser.add_argument("--wan-mbit", type=float, default=100.0, help="relay bandwidth")
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each repeat, wait up to this many seconds for other processes to "
        "use < 0.25 cores (0: do not wait)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="OUT_DIR",
        help="after the timed runs, profile client and servers of the first swarm with "
        "py-spy (pip install py-spy) for --py-spy-seconds and summarise where time goes",
    )
    parser.add_argument("--py-spy-seconds", type=float, default=20.0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print where a step's time goes on the client and on each server "
        "(instrumented: tokens/s of such a run are lower than without it)",
    )
    parser.add_argument("--py-spy-bin", default=shutil.which("py-spy") or "py-spy")
    args = parser.parse_args()
    if args.wan_delay_ms < 0 or args.wan_mbit <= 0:
        parser.error("--wan-delay-ms >= 0 and --wan-mbit > 0")

    ensure_model(args.model_dir)
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trustswarm.client import DistributedModelForCausalLM

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    n = args.new_tokens
    work = Path(tempfile.mkdtemp(prefix="trustswarm-bench-"))
    wan = None
    if args.wan_delay_ms:
        from trustswarm.testing.relay import mbit

        wan = (args.wan_delay_ms / 2000, mbit(args.wan_mbit))
    swarms = [
        Swarm(f"threads-{t or 'default'}", args.model_dir, t, work, wan, args.profile)
        for t in parse_threads(args.server_threads)
    ]
    variants = [
        Variant(swarm, chaining, args.chaining == "both")
        for swarm in swarms
        for chaining in {"on": [True], "off": [False], "both": [True, False]}[args.chaining]
    ]
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, load avg {os.getloadavg()[0]:.2f}; chaining "
        f"{args.chaining}, " + (f"relays of {args.wan_delay_ms:g} ms RTT" if wan else "loopback"),
        flush=True,
    )
    models: dict[str, object] = {}
    # One client tally per swarm, as its servers keep one (with --chaining both, the
    # chained and the client-driven client of a swarm share it).
    profile = ClientProfile(enabled=args.profile)
    tallies = {s.name: Tally() for s in swarms}
    results: dict[str, dict] = {}
    try:
        t = time.perf_counter()
        for swarm in swarms:
            swarm.start_first()
        for swarm in swarms:
            swarm.start_rest()
        print(f"started {len(swarms)} swarm(s) of 3 servers in {time.perf_counter() - t:.1f} s")
        local = load_local_model(args.model_dir)
        local_threads = torch.get_num_threads()
        if args.profile:
            profile.install()
        for variant in variants:
            model = DistributedModelForCausalLM.from_pretrained(
                args.model_dir, variant.swarm.client_peers, chaining=variant.chaining
            )
            if args.profile:
                profile.hook(model)
            models[variant.name] = model

        def generate(variant: Variant) -> tuple[float, list[int], list[float]]:
            profile.tally = tallies[variant.swarm.name]  # servers count every step too
            try:
                return run_swarm_steps(models[variant.name], ids, n)
            finally:
                profile.run_ended()

        # Warm-up (not timed): one full generation each.
        warm_local = run_local(local, ids, n)[1]
        for swarm in variants:
            generate(swarm)
        print(f"warm-up done; local answer: {tokenizer.decode(warm_local).strip()[:100]!r}")

        own_pids = [os.getpid(), *(pid for s in swarms for pid in s.pids)]
        local_runs: list[dict] = []
        swarm_runs: dict[str, list[dict]] = {v.name: [] for v in variants}
        for r in range(args.repeats):
            wait_for_quiet(own_pids, args.quiet_wait)
            with CpuWatch(own_pids) as cpu:
                seconds, tokens, steps = run_local(local, ids, n)
            local_runs.append(
                {"seconds": seconds, "tokens": tokens, "steps": steps, "foreign": cpu.foreign_cores}
            )
            line = f"repeat {r + 1}: local {n / seconds:6.2f} tok/s"
            for swarm in variants:
                with CpuWatch(own_pids) as cpu:
                    seconds, tokens, steps = generate(swarm)
                swarm_runs[swarm.name].append(
                    {
                        "seconds": seconds,
                        "tokens": tokens,
                        "steps": steps,
                        "foreign": cpu.foreign_cores,
                    }
                )
                line += f" | {swarm.name} {n / seconds:6.2f} tok/s"
            print(line, flush=True)
        if args.py_spy:
            first = variants[0]
            profile.tally = tallies[first.swarm.name]
            pids = {"client": os.getpid()}
            pids |= {f"server{i}": p for i, p in enumerate(first.swarm.pids)}
            pyspy_phase(
                args.py_spy_bin,
                args.py_spy,
                models[first.name],
                pids,
                ids,
                n,
                args.py_spy_seconds,
            )
    finally:
        for model in models.values():
            model.close()
        server_tallies = {s.name: s.stop() for s in swarms}

    # -- report ---------------------------------------------------------------------------
    local_tps = statistics.median(n / run["seconds"] for run in local_runs)
    local_decode = _mean([1000 * s for run in local_runs for s in run["steps"][1:]])
    local_prefill = _mean([1000 * run["steps"][0] for run in local_runs])
    reference = local_runs[0]["tokens"]
    print()
    print(
        f"=== {n} new tokens, greedy, prompt of {ids.shape[1]} tokens, median of {args.repeats} ==="
    )
    print(f"local torch threads: {local_threads} (torch.get_num_threads() in the client process)")
    header = f"{'variant':<22}{'tok/s':>8}{'swarm/local':>13}{'prefill ms':>12}{'decode ms/tok':>15}{'same tokens':>13}{'foreign CPU':>13}"
    print(header)
    print("-" * len(header))
    foreign = max(run["foreign"] for run in local_runs)
    print(
        f"{'local (HF generate)':<22}{local_tps:8.2f}{'':>13}{local_prefill:12.1f}{local_decode:15.1f}"
        f"{'ref':>13}{foreign:12.2f}c"
    )
    results["local"] = {
        "tokens_per_s": local_tps,
        "prefill_ms": local_prefill,
        "decode_ms": local_decode,
        "torch_threads": local_threads,
        "runs": [{k: v for k, v in run.items() if k != "steps"} for run in local_runs],
    }
    for swarm in variants:
        runs = swarm_runs[swarm.name]
        tps = statistics.median(n / run["seconds"] for run in runs)
        same = all(run["tokens"] == reference for run in runs)
        first_diff = next(
            (
                i
                for i, (a, b) in enumerate(zip(runs[0]["tokens"], reference, strict=False))
                if a != b
            ),
            None,
        )
        prefill = _mean([1000 * run["steps"][0] for run in runs])
        decode = _mean([1000 * s for run in runs for s in run["steps"][1:]])
        label = f"swarm, {swarm.name}"
        foreign = max(run["foreign"] for run in runs)
        same_text = "yes" if same else f"no (@{first_diff})"
        print(
            f"{label:<22}{tps:8.2f}{tps / local_tps:13.2f}{prefill:12.1f}"
            f"{decode:15.1f}{same_text:>13}{foreign:12.2f}c"
        )
        results[swarm.name] = {
            "chaining": swarm.chaining,
            "wan_rtt_ms": args.wan_delay_ms,
            "profiled": args.profile,
            "tokens_per_s": tps,
            "ratio": tps / local_tps,
            "prefill_ms": prefill,
            "decode_ms": decode,
            "same_tokens": same,
            "first_difference": first_diff,
            "runs": [{k: v for k, v in run.items() if k != "steps"} for run in runs],
        }
    print(
        "(goal: swarm/local >= 0.9; 'foreign CPU' = cores used by other processes, max over runs)"
    )
    if args.profile:
        for swarm in swarms:
            print(f"\n##### {swarm.name}: local HF {local_decode:.2f} ms per decode step")
            results[f"profile {swarm.name}"] = print_profile(
                tallies[swarm.name], server_tallies[swarm.name]
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
