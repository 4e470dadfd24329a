"""False fraud reports against honest servers (issue 10: "0 honest servers banned or failed
after the framing search's best inputs and >= 100 spliced or framed reports").

    .venv/bin/python bench/adversary_reports.py                 # ~4 min on a loaded 2-core VM
    .venv/bin/python bench/adversary_reports.py --max-minutes 5 --splice-rounds 6

On the tiny test model (tests/tiny_model.py, in a temp dir), in-process real hosts as the
tests run them (tests/swarm.py, tests/verifier_env.py): 2 honest float32 and 2 honest
bfloat16 servers of all 6 blocks and one real verifier (spot-checks effectively off:
`check_every` 3600 s; reports rate limit raised to `--max-reports` per reporter and
minute). Each server first gets `--warmup-passes` passed spot-checks so that it is `ok`
(out of probation). Then, interleaved until every job ran or `--max-minutes` is up:

* splice rounds (trustswarm.testing.splicing): a SplicingClient records two sessions on
  one server and one on another (same client part, over a sub-span), and reports every
  splice it offers (same id other run, spliced tail, reordered, middle step dropped, not
  from step 0, two servers) and the genuine transcript, each as a false accusation;
* framing (trustswarm.testing.framing, framing_client): for each of `--framing-spans`,
  the framing searches (cancel, bf16 error, extreme) from a real prompt's hidden state,
  all inputs best first, each sent to every server as a forward and as an inference
  step, the signed answer reported. The requests and reports are FramingClient's own
  (span_call, ask_forward, ask_session, FramingClient.report, send_report), sent from one
  asking and one reporting host per (span, server): FramingClient.frame makes a fresh
  host per call and per report, and a host closed by `running_host` leaves its TCP
  connections open (both ends ESTABLISHED) while the process lives, so after ~200-250
  reports from one process the verifier's inbound connection cap (py-libp2p's
  max_connections - min_connections = 250) is full and it refuses new connections
  (`--framing-client` runs FramingClient.frame as is: 215 of 540 reports failed so).

Every verdict is counted per kind (upheld / rejected / rate_limited / error); rejected
ones also by why (evidence refused, agrees with the reference, outside tolerance but
within the proof margin). At the end each server's state is read from the verifier's
store and from its published records: all must be `ok` with 0 failures and no ban.
Writes bench/results/adversary_reports.md and .json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import trio  # noqa: E402

from trustswarm.client.reports import send_report  # noqa: E402
from trustswarm.models.runner import BlockRunner  # noqa: E402
from trustswarm.models.store import ModelDir  # noqa: E402
from trustswarm.protocol.evidence import Evidence  # noqa: E402
from trustswarm.protocol.identity import Identity  # noqa: E402
from trustswarm.protocol.transport import make_host, running_host  # noqa: E402
from trustswarm.testing.framing import FramingInput, framing_inputs  # noqa: E402
from trustswarm.testing.framing_client import (  # noqa: E402
    KINDS,
    FramingClient,
    FramingTarget,
    ask_forward,
    ask_session,
    span_call,
)
from trustswarm.testing.local_swarm import LocalSwarm, RunningServer  # noqa: E402
from trustswarm.testing.local_verifier import RunningVerifier, start_verifier, stop_verifier  # noqa: E402
from trustswarm.testing.splicing import accusation, splices, splicing_client  # noqa: E402
from trustswarm.testing.tiny_model import make_tiny_model_dir  # noqa: E402
from trustswarm.verifier.config import CheckConfig, ReportConfig, VerifierConfig  # noqa: E402

FULL = (0, 6)  # the tiny model has 6 blocks
SPLICE_SPANS = ((1, 5), (0, 6), (2, 4), (0, 3), (3, 6))
FRAMING_SPANS = "0:6,1:5,2:4,0:3,3:6"
VERDICT_COLUMNS = ("upheld", "rejected", "rate_limited", "error")
DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16)
PROMPT = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])
Job = tuple[str, Callable[[], Awaitable[None]]]  # (name, coroutine function)


@dataclass
class Tally:
    """Verdicts of one kind of report."""

    family: str  # "splice" | "genuine" | "framing"
    verdicts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICT_COLUMNS, 0))
    why: dict[str, int] = field(default_factory=dict)  # rejected: how, by detail
    samples: list[str] = field(default_factory=list)  # the last few details (2 rejected)
    judge: dict[str, int] = field(default_factory=dict)  # framed: the judge's own finding

    @property
    def total(self) -> int:
        return sum(self.verdicts.values())


@dataclass
class Run:
    """Everything the bench measured."""

    servers: dict[str, str] = field(default_factory=dict)  # peer id -> dtype
    tallies: dict[str, Tally] = field(default_factory=dict)
    accused: dict[str, int] = field(default_factory=dict)  # peer id -> reports against it
    before: dict[str, dict[str, Any]] = field(default_factory=dict)  # state after warm-up
    after: dict[str, dict[str, Any]] = field(default_factory=dict)
    searches: list[dict[str, Any]] = field(default_factory=list)
    warmup: dict[str, int] = field(default_factory=dict)  # spot-check outcome -> n
    jobs: dict[str, int] = field(default_factory=lambda: {"planned": 0, "ran": 0, "cut": 0})
    problems: list[str] = field(default_factory=list)

    def judged(self, kind: str, how: str) -> None:
        tally = self.tallies.setdefault(kind, Tally("framing"))
        tally.judge[how] = tally.judge.get(how, 0) + 1

    def count(self, kind: str, family: str, verdict: str, detail: str, accused: str) -> None:
        tally = self.tallies.setdefault(kind, Tally(family))
        tally.verdicts[verdict] = tally.verdicts.get(verdict, 0) + 1
        if verdict == "rejected":
            why = how_rejected(detail)
            tally.why[why] = tally.why.get(why, 0) + 1
        if verdict != "rejected" or len(tally.samples) < 2:
            tally.samples.append(f"{verdict}: {detail[:300]}")
            del tally.samples[:-4]
        self.accused[accused] = self.accused.get(accused, 0) + 1


def how_rejected(detail: str) -> str:
    if "rejected evidence" in detail:
        return "evidence refused"
    if "not beyond the proof margin" in detail:
        return "within proof margin"
    if "agrees with the reference" in detail:
        return "agrees"
    return "other"


@dataclass
class Bench:
    swarm: LocalSwarm
    verifier: RunningVerifier
    servers: list[RunningServer]
    run: Run
    deadline: float

    @property
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def bounded(self, fn: Callable[[], Awaitable[object]], reserve: float = 0.0) -> bool:
        """Run `fn` in the swarm's loop until done or the deadline (less `reserve`);
        False if it was cut off."""
        limit = self.left - reserve
        if limit <= 0:
            return False

        async def job() -> bool:
            with trio.move_on_after(limit):
                await fn()
                return True
            return False

        return self.swarm.loop.run(job)


# -- set-up --------------------------------------------------------------------------------


def start(model_dir: Path, db_url: str, max_reports: int, deadline: float) -> Bench:
    swarm = LocalSwarm(model_dir)
    run = Run()
    try:
        servers = [swarm.start_server(FULL, dtype=d) for d in DTYPES]
        for running, dtype in zip(servers, DTYPES, strict=True):
            run.servers[running.peer_id] = str(dtype).removeprefix("torch.")
        config = VerifierConfig(
            checks=CheckConfig(check_every=3600.0),
            reports=ReportConfig(max_reports=max_reports),
        )
        verifier = start_verifier(swarm, db_url, config, seed=7)
    except BaseException:
        swarm.close()
        raise
    bench = Bench(swarm, verifier, servers, run, deadline)
    view = verifier.verifier.view
    waited = time.monotonic() + 30
    while len(view.servers) < len(servers) and time.monotonic() < waited:
        time.sleep(0.1)
    if len(view.servers) < len(servers):
        run.problems.append(f"the verifier saw {len(view.servers)}/{len(servers)} servers")
    return bench


def state_of(bench: Bench, peer: str) -> dict[str, Any]:
    """The server's state in the verifier's store and in its newest published record."""
    v = bench.verifier.verifier
    rep = bench.verifier.store.get(peer, v.model_id)
    published = {r.record.subject: r.record for r in bench.verifier.store.published(v.model_id)}
    record = published.get(peer)
    return {
        "state": rep.state if rep else None,
        "passes": rep.passes if rep else 0,
        "failures": rep.failures if rep else 0,
        "ban_reason": rep.ban_reason if rep else None,
        "ban_proof": bench.verifier.store.ban_proof(peer, v.model_id) is not None,
        "published_state": record.state if record else None,
        "published_failures": record.failures if record else None,
    }


def warm_up(bench: Bench, passes: int, attempts: int) -> None:
    """Spot-check each server (as the verifier's checkers do) until it has `passes`
    passes, so that "still ok" means something."""
    v = bench.verifier.verifier
    for running in bench.servers:
        for _ in range(attempts):
            rep = bench.verifier.store.get(running.peer_id, v.model_id)
            if (rep.passes if rep else 0) >= passes or bench.left < 60:
                break
            ann = v.view.servers.get(running.peer_id)
            if ann is None:
                time.sleep(0.5)
                continue
            result = bench.swarm.loop.run(v.checker.check, ann)
            bench.run.warmup[result.outcome] = bench.run.warmup.get(result.outcome, 0) + 1
            if result.outcome not in ("pass", "skipped", "refused"):
                bench.run.problems.append(f"warm-up check {result.outcome}: {result.detail}")
            if result.outcome == "skipped":
                time.sleep(0.5)  # the checker clients are still starting
        bench.run.before[running.peer_id] = state_of(bench, running.peer_id)


# -- splicing ------------------------------------------------------------------------------


def splice_round(
    bench: Bench, target: RunningServer, other: RunningServer, span: tuple[int, int], seed: int
) -> Callable[[], Awaitable[None]]:
    """A job: record two sessions on `target` and one on `other`, report every splice."""
    addr = bench.verifier.addrs[0]
    run = bench.run

    async def job() -> None:
        swarm = bench.swarm
        async with splicing_client(swarm.model_dir, swarm.initial_peers, seed) as client:
            ann = target.server.announcement.announcement
            other_ann = other.server.announcement.announcement
            a = await client.record(ann, *span, 4, seed)
            b = await client.record(ann, *span, 4, seed + 1)
            c = await client.record(other_ann, *span, 4, seed + 2)
            model_id = client.swarm.view.model_id
            for splice in splices(a, b, c):
                report = accusation(model_id, *span, splice.exchanges)
                kind = f"splice: {splice.name}" if splice.spliced else "genuine transcript"
                family = "splice" if splice.spliced else "genuine"
                accused = report.answers[0].peer_id
                try:
                    verdict = await send_report(client.swarm.host, addr, report, 90.0)
                except Exception as exc:  # noqa: BLE001 - counted, never fatal
                    run.count(kind, family, "error", describe(exc), accused)
                    continue
                run.count(kind, family, verdict.verdict, verdict.detail, accused)

    return job


def splice_jobs(bench: Bench, rounds: int, seed: int) -> list[Job]:
    """Targets cycle over the four servers, the other server over the other three (so
    both dtypes meet in "two servers"), spans over SPLICE_SPANS."""
    n = len(bench.servers)
    jobs = []
    for i in range(rounds):
        target = bench.servers[i % n]
        other = bench.servers[(i + 1 + (i // n) % (n - 1)) % n]
        span = SPLICE_SPANS[i % len(SPLICE_SPANS)]
        name = f"splice round {i} on {span[0]}:{span[1]}"
        jobs.append((name, splice_round(bench, target, other, span, seed + 10 * i)))
    return jobs


# -- framing -------------------------------------------------------------------------------


def search(
    model_dir: Path, span: tuple[int, int], args: argparse.Namespace, run: Run
) -> list[FramingInput]:
    """The framing searches' inputs for `span` from a real prompt's last hidden state
    entering the span, best (largest honest bfloat16-vs-float32 error) first."""
    md = ModelDir.open(model_dir)
    start, end = span
    began = time.monotonic()
    with torch.inference_mode():
        h = md.load_client_parts().embed_tokens(PROMPT).float()
        if start:
            h = BlockRunner(md, 0, start, torch.float32).forward(h, None, None, 0, start)
    runners = tuple(
        BlockRunner(md, start, end, d) for d in (torch.float64, torch.float32, torch.bfloat16)
    )
    notes: list[str] = []
    inputs = framing_inputs(
        runners,  # type: ignore[arg-type]
        start,
        end,
        h[:, -1:].contiguous(),
        lm_iterations=args.lm_iterations,
        search_iterations=args.search_iterations,
        rng=random.Random(args.seed + start),
        max_seconds=args.search_seconds,
        progress=notes.append,
    )
    inputs = inputs[: args.framing_inputs]
    run.searches.append(
        {
            "span": f"{start}:{end}",
            "seconds": round(time.monotonic() - began, 1),
            "progress": notes,
            "inputs": [
                {
                    "objective": f.objective,
                    "label": f.label,
                    "bf16_vs_f32_error": f.error,
                    "abs_ratio": f.abs_ratio,
                }
                for f in inputs
            ],
        }
    )
    return inputs


async def judged(bench: Bench, evidence: Evidence) -> str:
    """What the verifier's own judge makes of a framed answer, past the verdict (which
    says "agrees" also when the answer differed only on an ill-conditioned token)."""
    v = bench.verifier.verifier
    try:
        j = await v.compute(v.desk.judge.judge, evidence)
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        return f"judge error: {type(exc).__name__}"
    if j.wrong:
        return "proven wrong" if j.proven else "wrong, within proof margin"
    return "inconclusive" if j.inconclusive else "agrees"


def frame_job(
    bench: Bench, running: RunningServer, span: tuple[int, int], inputs: list[FramingInput]
) -> Callable[[], Awaitable[None]]:
    """A job: what `FramingClient.frame` does (its own span_call, ask_forward, ask_session
    and report), from one asking and one reporting host for the whole job."""
    span_digest = bench.swarm.model_dir.manifest.span_digest
    target = FramingTarget(running.peer_id, tuple(running.addrs))
    addr = bench.verifier.addrs[0]

    async def job() -> None:
        asker, reporter = make_host(Identity.generate()), make_host(Identity.generate())
        async with running_host(asker, []), running_host(reporter, []):
            call = await span_call(asker, target, span, span_digest, 60.0)
            for item in inputs:
                for kind in KINDS:
                    name = framed_kind(bench, running, item.objective, kind)
                    ask = ask_forward if kind == "forward" else ask_session
                    try:
                        exchange = await ask(asker, call, item.hidden, item.positions, 60.0)
                        report = FramingClient.report(call, kind, Evidence((exchange,)), item)
                        verdict = await send_report(reporter, addr, report, 90.0)
                    except Exception as exc:  # noqa: BLE001 - counted, never fatal
                        bench.run.count(name, "framing", "error", describe(exc), running.peer_id)
                        continue
                    bench.run.count(
                        name, "framing", verdict.verdict, verdict.detail, running.peer_id
                    )
                    bench.run.judged(name, await judged(bench, report.answers[0].evidence))

    return job


def frame_job_client(
    bench: Bench, running: RunningServer, span: tuple[int, int], inputs: list[FramingInput]
) -> Callable[[], Awaitable[None]]:
    """A job: `FramingClient.frame` as is, one call per input (a fresh host per call and
    per report)."""
    span_digest = bench.swarm.model_dir.manifest.span_digest
    client = FramingClient(bench.verifier.addrs[0], timeout=60.0, span_digest=span_digest)
    target = FramingTarget(running.peer_id, tuple(running.addrs))
    run = bench.run

    async def job() -> None:
        sent = 0
        for item in inputs:
            try:
                outcomes = await client.frame(target, [item], span)
            except Exception as exc:  # noqa: BLE001 - counted, never fatal
                for kind in KINDS:
                    name = framed_kind(bench, running, item.objective, kind)
                    run.count(name, "framing", "error", describe(exc), running.peer_id)
                continue
            for o in outcomes:
                name = framed_kind(bench, running, o.objective, o.kind)
                verdict, detail = (
                    ("error", o.error)
                    if o.verdict is None
                    else (o.verdict.verdict, o.verdict.detail)
                )
                run.count(name, "framing", verdict, detail, running.peer_id)
            for report in client.reports[sent:]:
                name = framed_kind(bench, running, item.objective, report.kind)
                run.judged(name, await judged(bench, report.answers[0].evidence))
            sent = len(client.reports)

    return job


def framed_kind(bench: Bench, running: RunningServer, objective: str, kind: str) -> str:
    return f"framed {objective}, {kind}, {bench.run.servers[running.peer_id]} server"


def describe(exc: BaseException) -> str:
    """The first leaf of trio's exception groups, as "Type: message"."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def framing_jobs(bench: Bench, model_dir: Path, args: argparse.Namespace) -> list[Job]:
    jobs = []
    for text in args.framing_spans.split(","):
        first, last = (int(x) for x in text.split(":"))
        span = (first, last)
        if bench.left < 120:
            bench.run.problems.append(f"no time left for the framing search on {text}")
            break
        inputs = search(model_dir, span, args, bench.run)
        for running in bench.servers:
            name = f"framing {text} on {bench.run.servers[running.peer_id]} {running.peer_id}"
            make = frame_job_client if args.framing_client else frame_job
            jobs.append((name, make(bench, running, span, inputs)))
    return jobs


# -- the run -------------------------------------------------------------------------------


def interleave(a: list[Job], b: list[Job]) -> list[Job]:
    out = []
    for i in range(max(len(a), len(b))):
        out += a[i : i + 1] + b[i : i + 1]
    return out


def run_jobs(bench: Bench, jobs: list[Job], reserve: float) -> None:
    run = bench.run
    run.jobs["planned"] = len(jobs)
    for name, job in jobs:
        t = time.monotonic()
        try:
            done = bench.bounded(job, reserve)
        except Exception as exc:  # noqa: BLE001 - a job's failure is a finding, not a crash
            run.problems.append(f"{name}: {describe(exc)}"[:400])
            done = True
        if not done:
            run.jobs["cut"] += 1
            run.problems.append(f"{name}: cut off by --max-minutes")
            break
        run.jobs["ran"] += 1
        sent = sum(t.total for t in run.tallies.values())
        print(
            f"[reports] {name}: done in {time.monotonic() - t:.0f} s ({sent} reports)", flush=True
        )


def wait_for_records(bench: Bench, since: float, timeout: float) -> None:
    """Wait until every server's published record was issued after `since` (the verifier
    re-publishes every record every `republish_every` seconds)."""
    v = bench.verifier.verifier
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        issued = {
            r.record.subject: r.record.issued_at for r in bench.verifier.store.published(v.model_id)
        }
        if all(issued.get(s.peer_id, 0.0) > since for s in bench.servers):
            return
        time.sleep(1.0)
    bench.run.problems.append(f"no fresh published record for every server in {timeout:.0f} s")


def verdict_line(run: Run) -> tuple[bool, str]:
    """PASS: >= 100 spliced or framed reports judged (upheld or rejected), none upheld,
    every honest server ok with 0 failures and no ban, in the store and its record."""

    def judged(family: str, same: bool) -> int:
        return sum(
            t.verdicts["upheld"] + t.verdicts["rejected"]
            for t in run.tallies.values()
            if (t.family == family) == same
        )

    sent = sum(t.total for t in run.tallies.values() if t.family != "genuine")
    upheld = sum(t.verdicts["upheld"] for t in run.tallies.values())
    bad = [
        p
        for p, s in run.after.items()
        if s["state"] != "ok"
        or s["failures"]
        or s["ban_proof"]
        or s["published_state"] not in ("ok", None)
        or s["published_failures"]
    ]
    false_judged = judged("genuine", False)
    ok = not bad and upheld == 0 and false_judged >= 100 and len(run.after) == len(run.servers)
    text = (
        f"{'PASS' if ok else 'FAIL'}: {false_judged} spliced or framed reports judged "
        f"({sent} sent; + {judged('genuine', True)} genuine transcripts judged), {upheld} "
        f"upheld; honest servers not ok or with failures: {len(bad)}/{len(run.after)}"
    )
    return ok, text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--splice-rounds", type=int, default=20, help="7 reports each")
    parser.add_argument("--framing-spans", default=FRAMING_SPANS)
    parser.add_argument("--framing-inputs", type=int, default=10, help="best N per span")
    parser.add_argument("--lm-iterations", type=int, default=200)
    parser.add_argument("--search-iterations", type=int, default=200)
    parser.add_argument("--search-seconds", type=float, default=60.0)
    parser.add_argument("--warmup-passes", type=int, default=6)
    parser.add_argument("--max-reports", type=int, default=100_000, help="per reporter/min")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--framing-client",
        action="store_true",
        help="frame through FramingClient.frame as is: a fresh libp2p host per report "
        "(closed hosts' TCP connections stay open in-process; after ~250 the verifier "
        "refuses new connections)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.disable(logging.WARNING)  # libp2p chatter; verdicts are what we count
    torch.set_num_threads(1)  # tiny ops: threads only slow a loaded 2-core machine down

    began = time.monotonic()
    deadline = began + 60 * args.max_minutes
    tmp = Path(tempfile.mkdtemp(prefix="adversary-reports-"))
    model_dir = make_tiny_model_dir(tmp)
    bench = start(model_dir, f"sqlite:///{tmp / 'verifier.db'}", args.max_reports, deadline)
    print(f"[reports] 4 servers + a verifier up in {time.monotonic() - began:.0f} s", flush=True)
    try:
        warm_up(bench, args.warmup_passes, attempts=3 * args.warmup_passes)
        print(f"[reports] warm-up checks: {bench.run.warmup}", flush=True)
        jobs = interleave(
            splice_jobs(bench, args.splice_rounds, args.seed),
            framing_jobs(bench, model_dir, args),
        )
        run_jobs(bench, jobs, reserve=60.0)
        wait_for_records(bench, time.time(), min(45.0, max(bench.left, 5.0)))
        for running in bench.servers:
            bench.run.after[running.peer_id] = state_of(bench, running.peer_id)
        checks = len(bench.verifier.store.checks(limit=100_000))
    finally:
        stop_verifier(bench.swarm, bench.verifier)
        bench.swarm.close()
    meta = {
        "command": "python bench/adversary_reports.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.monotonic() - began),
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "max_reports_per_minute": args.max_reports,
        "checks_in_store": checks,
        "framing_hosts": "FramingClient.frame as is (a fresh host per call and per report)"
        if args.framing_client
        else "FramingClient's calls from one asking and one reporting host per (span, server)",
    }
    ok, line = verdict_line(bench.run)
    meta["result"] = line
    path = write(args.out, meta, bench.run)
    print(render(meta, bench.run))
    print(f"[reports] wrote {path}")
    return 0 if ok else 1


# -- output --------------------------------------------------------------------------------

WHY = ("evidence refused", "agrees", "within proof margin", "other")


def kind_table(run: Run) -> list[str]:
    head = "| kind | reports | " + " | ".join(VERDICT_COLUMNS) + " | rejected: why | judge |"
    lines = [head, "|" + " --- |" * (len(VERDICT_COLUMNS) + 4)]
    order = {"splice": 0, "genuine": 1, "framing": 2}
    totals = dict.fromkeys(VERDICT_COLUMNS, 0)
    for kind, t in sorted(run.tallies.items(), key=lambda kv: (order[kv[1].family], kv[0])):
        why = ", ".join(f"{w} {t.why[w]}" for w in WHY if t.why.get(w))
        cells = " | ".join(str(t.verdicts[v]) for v in VERDICT_COLUMNS)
        judge = ", ".join(f"{k} {n}" for k, n in sorted(t.judge.items()))
        lines.append(f"| {kind} | {t.total} | {cells} | {why} | {judge} |")
        for v in VERDICT_COLUMNS:
            totals[v] += t.verdicts[v]
    cells = " | ".join(f"**{totals[v]}**" for v in VERDICT_COLUMNS)
    lines.append(f"| **all** | **{sum(totals.values())}** | {cells} | | |")
    return lines


def server_table(run: Run) -> list[str]:
    lines = [
        "| server | dtype | reports against it | state before → after | passes | failures "
        "| banned (proof kept) | published record |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for peer, dtype in run.servers.items():
        b, a = run.before.get(peer, {}), run.after.get(peer, {})
        lines.append(
            f"| `{peer[-8:]}` | {dtype} | {run.accused.get(peer, 0)} | {b.get('state')} → "
            f"{a.get('state')} | {a.get('passes')} | {a.get('failures')} | "
            f"{a.get('ban_proof')} | {a.get('published_state')}, failures "
            f"{a.get('published_failures')} |"
        )
    return lines


def search_table(run: Run) -> list[str]:
    lines = [
        "| span | s | best inputs: objective (label) bf16-vs-f32 error |",
        "| --- | --- | --- |",
    ]
    for s in run.searches:
        best = "; ".join(
            f"{i['objective']} ({i['label']}) {i['bf16_vs_f32_error']:.3g}" for i in s["inputs"][:4]
        )
        lines.append(f"| {s['span']} | {s['seconds']} | {best} |")
    return lines


def render(meta: dict[str, Any], run: Run) -> str:
    load = ", ".join(str(x) for x in meta["load_average"])
    parts = [
        "# False fraud reports against honest servers",
        "",
        f"`{meta['command'].strip()}`: {meta['date']}, {meta['seconds']} s, {meta['host']}, "
        f"load average {load} (1/5/15 min) at the end.",
        "",
        f"**{meta['result']}**",
        "",
        "Tiny model, in-process real hosts on loopback: 2 honest float32 + 2 honest bfloat16 "
        "servers of blocks 0:6, one real verifier (spot-checks off, reports limited to "
        f"{meta['max_reports_per_minute']} per reporter per minute). Each server got "
        f"passed spot-checks first so it is `ok` ({meta['checks_in_store']} checks in the "
        f"store; warm-up outcomes {run.warmup}). Framed requests and reports: "
        f"{meta['framing_hosts']}.",
        "",
        "## Verdicts per kind",
        "",
        *kind_table(run),
        "",
        "*rejected: why*, from the verdict's detail: evidence refused (signatures, digests, "
        "the session chain), agrees (recomputed: within tolerance), within proof margin "
        "(outside tolerance but not proof: a report about it changes nothing). *judge*: "
        "each framed answer judged again by the verifier's own Judge after the verdict: "
        "agrees, inconclusive (differs only on ill-conditioned tokens: the S_t / kappa "
        "floor), wrong within the proof margin, proven wrong.",
        "",
        "## Honest servers afterwards (verifier store and published records)",
        "",
        *server_table(run),
        "",
        "## Framing searches (inputs sent, best first)",
        "",
        *search_table(run),
        "",
        f"Jobs: {run.jobs}.",
    ]
    if run.problems:
        parts += ["", "## Problems", "", *(f"* {p}" for p in run.problems)]
    return "\n".join(parts) + "\n"


def write(out: Path, meta: dict[str, Any], run: Run) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, **asdict(run)}
    (out / "adversary_reports.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    path = out / "adversary_reports.md"
    path.write_text(render(meta, run))
    return path


if __name__ == "__main__":
    sys.exit(main())
