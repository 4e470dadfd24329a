"""The performance table of issue 6 §1, in one run: `make bench-table`.

    python bench/table.py [--quick] [--repeats 3] [--rows local,offload,...] [--out DIR]

Rows, all with the real SmolLM2-135M-Instruct on this machine:

  local      Hugging Face LlamaForCausalLM, all blocks in memory
  offload    the same model, but before each block runs its weights are read from its
             safetensors file and copied in (what offloading does for every step)
  swarm      3 `node start --threads 1` servers on loopback (blocks 0:10, 10:20, 20:30)
  wan        the same behind one relay per server (trustswarm/testing/relay.py) simulating 100 Mbit/s
             and 100 ms RTT; servers `--announce-addr` their relay, so all client traffic
             crosses it
  clients    N (8) client processes at once on the `swarm` servers: per client and aggregate
  red2/red3  redundancy=2 / =3 on 9 servers (3 per span; `from_pretrained(redundancy=k)`)
  verifier   the `swarm` setup plus `trustswarm verifier start` spot-checking at its default
             rate (the verifier recomputes on this same machine)

Columns: inference steps/s after a short and a long prefix (decode steps only, the
prefill is not timed), forward tokens/s at batch 1 and 16. Each figure is the median of
`--repeats` with [min–max]; ⚠ marks a spread over 20 %. Ratios against local and
offloading sit under each figure. Writes table.md, table.png and table.json to --out.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from generation import CpuWatch, wait_for_quiet  # noqa: E402
from table_measure import COLUMNS, Workload, load_local, make_offloading  # noqa: E402
from table_report import Row, markdown, plot  # noqa: E402
from table_swarm import (  # noqa: E402
    ClientWorkers,
    Servers,
    stop_all,
    verifier_available,
)

from trustswarm.testing.relay import mbit  # noqa: E402

SPANS = ["0:10", "10:20", "20:30"]
ROWS = ("local", "offload", "swarm", "wan", "clients", "red2", "red3", "verifier")
ROW_ORDER = (
    "local",
    "offload",
    "swarm",
    "wan",
    "clients",
    "clients_sum",
    "red2",
    "red3",
    "verifier",
)
QUICK = Workload(short_prefix=16, long_prefix=128, steps=4, seq=16, big_batch=4, repeats=2)
REQUEST_TIMEOUT = 300.0  # a queue of 8 clients' batches on a loaded 2-core machine is slow


class Bench:
    def __init__(self, args: argparse.Namespace, workload: Workload) -> None:
        self.args = args
        self.workload = workload
        self.work = Path(tempfile.mkdtemp(prefix="trustswarm-table-"))
        self.rows: list[Row] = []
        self.vocab = 0

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def measure(self, row: Row, model, pids: list[int], steps: int = 0) -> None:
        if self.args.quiet_wait:
            wait_for_quiet([os.getpid(), *pids], self.args.quiet_wait)
        began = time.perf_counter()
        with CpuWatch([os.getpid(), *pids]) as cpu:
            for seed, column in enumerate(COLUMNS):
                row.values[column] = self.workload.measure(model, column, self.vocab, seed, steps)
                self.log(f"  {row.key} {column}: {[round(v, 2) for v in row.values[column]]}")
        row.foreign_cores = cpu.foreign_cores
        row.seconds = time.perf_counter() - began

    # -- rows -------------------------------------------------------------------------

    def local_rows(self, wanted: set[str]) -> None:
        import torch

        model = load_local(self.args.model_dir)
        self.vocab = model.config.vocab_size
        self.workload.measure(model, "inf_short", self.vocab, 99, 2)  # warm-up
        if "local" in wanted:
            row = Row("local", "local HF, all blocks in memory")
            self.log("row: local")
            self.measure(row, model, [])
            self.rows.append(row)
        if "offload" in wanted:
            row = Row("offload", "offloading: every block's weights read from disk each step")
            self.log("row: offload")
            handles = make_offloading(model, self.args.model_dir)
            self.measure(row, model, [], steps=max(2, self.workload.steps // 4))
            for handle in handles:
                handle.remove()
            self.rows.append(row)
        del model
        gc.collect()
        torch.set_num_threads(self.args.local_threads)

    def client(self, peers: list[str], redundancy: int = 1):
        from trustswarm.client import DistributedModelForCausalLM

        kwargs = {"request_timeout": REQUEST_TIMEOUT}
        if redundancy > 1:
            kwargs["redundancy"] = redundancy
        model = DistributedModelForCausalLM.from_pretrained(self.args.model_dir, peers, **kwargs)
        self.vocab = self.vocab or model.config.vocab_size
        from table_measure import inference_steps_per_s

        inference_steps_per_s(model, 8, 2, 1, self.vocab)  # warm-up: routes, sessions
        return model

    def swarm_row(self, key: str, label: str, servers: Servers, redundancy: int = 1) -> Row:
        row = Row(key, label)
        self.log(f"row: {key}")
        with self.client(servers.client_peers, redundancy) as model:
            self.measure(row, model, servers.pids)
        return row

    def clients_rows(self, servers: Servers) -> None:
        n = self.args.clients
        per = Row("clients", f"{n} concurrent clients: per client (all clients' values)")
        total = Row("clients_sum", f"{n} concurrent clients: aggregate")
        self.log(f"row: {n} concurrent clients (starting {n} client processes)")
        workload = replace(self.workload, repeats=max(1, self.workload.repeats - 1))
        spec = {
            "workload": asdict(workload),
            "request_timeout": REQUEST_TIMEOUT,
        }
        workers = ClientWorkers(
            n, self.args.model_dir, servers.client_peers, spec, self.work / "clients"
        )
        try:
            pids = servers.pids + workers.pids
            if self.args.quiet_wait:
                wait_for_quiet([os.getpid(), *pids], self.args.quiet_wait)
            began = time.perf_counter()
            with CpuWatch([os.getpid(), *pids]) as cpu:
                for seed, column in enumerate(COLUMNS):
                    values, aggregate, wall = workers.run(column, seed)
                    per.values[column] = [v for client in values for v in client]
                    total.values[column] = aggregate
                    self.log(
                        f"  clients {column}: per-client median "
                        f"{statistics.median(per.values[column]):.2f}, aggregate "
                        f"{[round(v, 2) for v in total.values[column]]} ({wall:.0f} s)"
                    )
        finally:
            workers.close()
        for row in (per, total):
            row.foreign_cores = cpu.foreign_cores
            row.seconds = time.perf_counter() - began
            self.rows.append(row)

    def run(self) -> None:
        wanted = set(self.args.rows)
        if wanted & {"local", "offload"}:
            self.local_rows(wanted)
        else:
            import torch

            torch.set_num_threads(self.args.local_threads)
        model_dir = self.args.model_dir
        groups: dict[str, Servers] = {}
        if wanted & {"swarm", "clients", "verifier"}:
            groups["swarm"] = Servers(model_dir, self.work / "swarm", SPANS)
        if "wan" in wanted:
            link = (self.args.delay_ms / 2e3, mbit(self.args.mbit))
            groups["wan"] = Servers(model_dir, self.work / "wan", SPANS, wan=link)
        red = [k for k in (2, 3) if f"red{k}" in wanted]
        red_missing = redundancy_missing() if red else None
        if red and not red_missing and "swarm" not in groups:
            groups["swarm"] = Servers(model_dir, self.work / "swarm", SPANS)
        verifier_missing = verifier_available() if "verifier" in wanted else None
        if not groups:
            return
        self.log(
            f"starting {sum(len(g.spans) for g in groups.values())} servers "
            f"({', '.join(f'{k}: {len(g.spans)}' for k, g in groups.items())}) side by side"
        )
        try:
            for group in groups.values():
                group.launch()
            for group in groups.values():
                group.join()
            self.log("all servers up")
            self.swarm_rows(wanted, groups, red, red_missing, verifier_missing)
        finally:
            self.log("stopping servers")
            stop_all(list(groups.values()))
        if "wan" in groups and groups["wan"].relay is not None:
            self.wan_bytes = groups["wan"].relay.stats

    def swarm_rows(self, wanted, groups, red, red_missing, verifier_missing) -> None:
        """Rows on the 3 loopback servers first; then 6 more join them for redundancy."""
        if "swarm" in wanted:
            row = self.swarm_row("swarm", "swarm: 3 servers on loopback", groups["swarm"])
            self.rows.append(row)
        if "verifier" in wanted:
            label = "swarm: 3 servers + a verifier spot-checking (default rate)"
            if verifier_missing:
                self.rows.append(Row("verifier", label, note=f"not available: {verifier_missing}"))
            else:
                servers = groups["swarm"]
                self.log("starting the verifier")
                servers.start_verifier()
                try:
                    row = self.swarm_row("verifier", label, servers)
                finally:
                    servers.stop_verifier()
                row.note = servers.verifier_summary()
                self.rows.append(row)
        if "clients" in wanted:
            self.clients_rows(groups["swarm"])
        if "wan" in wanted:
            label = (
                f"swarm: 3 servers behind relays, {self.args.mbit:g} Mbit/s, "
                f"{self.args.delay_ms:g} ms RTT"
            )
            self.rows.append(self.swarm_row("wan", label, groups["wan"]))
        if red and not red_missing:
            self.log("starting 6 more servers: 3 per span for redundancy")
            groups["swarm"].extend(SPANS * 2)
        for k in red:
            label = f"swarm, redundancy={k} (9 servers, 3 per span)"
            if red_missing:
                self.rows.append(Row(f"red{k}", label, note=red_missing))
            else:
                self.rows.append(self.swarm_row(f"red{k}", label, groups["swarm"], k))
        order = {key: i for i, key in enumerate(ROW_ORDER)}
        self.rows.sort(key=lambda r: order.get(r.key, len(order)))


def redundancy_missing() -> str | None:
    from trustswarm.client import DistributedModelForCausalLM

    if (
        "redundancy"
        not in inspect.signature(DistributedModelForCausalLM.from_pretrained).parameters
    ):
        return "not available: from_pretrained has no redundancy= yet"
    return None


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def parse_rows(text: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 clients: smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 2)")
    parser.add_argument("--rows", type=parse_rows, default=list(ROWS))
    parser.add_argument("--clients", type=int, default=None, help="default 8 (quick: 2)")
    parser.add_argument("--local-threads", type=int, default=1, help="torch threads, client side")
    parser.add_argument("--delay-ms", type=float, default=100.0, help="simulated RTT")
    parser.add_argument("--mbit", type=float, default=100.0, help="simulated bandwidth")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each row wait up to this many s for other processes to go quiet",
    )
    args = parser.parse_args(argv)
    workload = QUICK if args.quick else Workload()
    if args.repeats:
        workload = replace(workload, repeats=args.repeats)
    args.clients = args.clients or (2 if args.quick else 8)
    ensure_model(args.model_dir)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.local_threads)
    bench = Bench(args, workload)
    bench.wan_bytes = None
    started, load_before = time.time(), os.getloadavg()
    with CpuWatch([os.getpid()]) as whole:
        bench.run()
    minutes = (time.time() - started) / 60
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    header = [
        f"Measured {stamp} by `bench/table.py{' --quick' if args.quick else ''}` in "
        f"{minutes:.1f} min on {machine()}, torch {torch.__version__} "
        f"(client and local model: {args.local_threads} torch thread(s); servers `--threads 1`).",
        "",
        f"**Shared machine:** other work (other agents' tests and builds) ran on the same cores "
        f"during this run; load average {load_before[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end. The column *other processes' CPU* gives how many "
        "cores' worth of CPU processes outside the benchmark took while each row ran: rows "
        "measured under more foreign load are slower for that reason alone. Compare ratios "
        "within a row's conditions with care; absolute figures drift by ±25 % or more.",
    ]
    notes = notes_for(args, workload, bench)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "table.quick" if args.quick else "table"
    text = markdown(bench.rows, workload, header, notes)
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(
        json.dumps(
            {
                "workload": asdict(workload),
                "rows": [asdict(r) for r in bench.rows],
                "header": header,
                "wan_relay_bytes": bench.wan_bytes,
                "foreign_cores_whole_run": whole.foreign_cores,
            },
            indent=1,
        )
    )
    problem = plot(bench.rows, workload, args.out / f"{name}.png")
    print(text)
    print(problem or f"wrote {args.out / name}.md/.png/.json")
    return 0


def notes_for(args: argparse.Namespace, workload: Workload, bench: Bench) -> list[str]:
    w = workload
    notes = [
        "How each figure is measured (bench/table_measure.py, the same code for every row):",
        f"- *inference steps/s*: greedy `generate` after a prompt of random tokens; only the "
        f"decode steps are timed (the prefill is not), in {w.repeats} consecutive windows of "
        f"{w.steps} steps of one generate call (the offloading row: {max(2, w.steps // 4)} steps "
        "per window). A step = embedding, 30 blocks, norm and LM head for one token.",
        f"- *forward tokens/s*: one forward of a [batch, {w.seq}] batch of random token ids, "
        f"logits included, repeated {w.repeats}×.",
        "- **bold** = median, [min–max] over the repeats, ⚠ = spread above 20 % (noisy). "
        "Under each figure: its ratio to local HF and to offloading.",
        (
            "offload",
            "- *offloading*: a forward pre-hook on every block reads the block's safetensors file "
            "(warm page cache: memory bandwidth, not disk) and copies it into the block before it "
            "runs, as offloading streams weights to the device for every step.",
        ),
        (
            "swarm",
            "- *swarm*: real `trustswarm node start --threads 1` processes on 127.0.0.1, a "
            "`DistributedModelForCausalLM` client in the benchmark process; each step goes client → "
            "server → client for every span (3 hops), every answer is signed and checked.",
        ),
        (
            "wan",
            f"- *relays*: trustswarm/testing/relay.py, one relay process per server, {args.delay_ms / 2:g} ms each "
            f"way and {args.mbit:g} Mbit/s per direction; the servers announce only the relay's "
            "address (`--announce-addr`), so the client's traffic crosses it (3 hops = 3 RTTs a step).",
        ),
        (
            "clients",
            f"- *concurrent clients*: {args.clients} separate client processes (one torch thread "
            f"each, {max(1, w.repeats - 1)} repeat(s)) on the 3 loopback servers, all told to start "
            "each measurement at once; "
            "per client = all clients' values together; aggregate = per repeat, all clients' "
            "decode steps (or tokens) divided by the time from the first client's start to the "
            "last client's end (windows that do not fully overlap make it conservative).",
        ),
        (
            "red",
            "- *redundancy=k*: the 3 loopback servers plus 6 more (3 per span); the client sends every span to k of them in "
            "parallel and compares the answers. On 2 cores the k replicas compete for the CPU, so "
            "this shows the compute cost of redundancy more than its latency cost.",
        ),
        (
            "verifier",
            "- *verifier*: the verifier daemon runs beside the servers on the same 2 cores and "
            "recomputes what it checks, so its CPU use slows the swarm here; on a separate machine "
            "only the servers' share of answering its checks would remain.",
        ),
    ]
    present = {r.key.removesuffix("_sum").rstrip("23") for r in bench.rows if r.available}
    notes = [
        n if isinstance(n, str) else n[1] for n in notes if isinstance(n, str) or n[0] in present
    ]
    notes.append(
        "- Rows are measured one after another, not at the same moment: a ratio between two "
        "rows also carries the change in the machine's load between them (see the CPU column)."
    )
    if bench.wan_bytes:
        total = sum(r["bytes_up"] + r["bytes_down"] for r in bench.wan_bytes)
        notes.append(f"- Bytes through the relays while their servers ran: {total / 1e6:.1f} MB.")
    for row in bench.rows:
        if row.note and row.available:
            notes.append(f"- {row.label}: {row.note}")
    return notes


if __name__ == "__main__":
    sys.exit(main())
