"""Client audits against a cheater no spot-check sees (issue 11): time to ban, wrong answers
delivered before it, and verifier CPU spent on audits, next to the derived bound.

    python bench/audits.py [--model-dir DIR] [--cheaters stream_reuse,rare:0.02] [--max-minutes 40]

Real SmolLM2 and real processes on 127.0.0.1: honest `node start` servers on blocks 0:10
and 20:30, one `verifier start` at default settings (spot-checks on; `--no-spot-checks`
turns them off), and, per trial, a cheater on 10:20 (fresh identity) from `--cheaters`:
`noise:F` (the demo's server: noise at `--amount` of each token's RMS on a fraction F of
its signed answers) or one of trustswarm.testing.recognising's cheaters, which skip a
block only when one cheap signal says "a client, not a check" (`stream_reuse`, `gossip`,
`connection_age`, `late_step`) or on a random share (`rare:0.02`). It is the only server
of 10:20, so every session goes through it. One client in this process, with the default
audit_rate and the verifier named by multiaddr, generates continuously (greedy,
`--new-tokens` per session, no early stop) until the cheater is banned or time is up.
Trials rotate over `--cheaters` until `--max-minutes` is spent. Writes
bench/results/audits.md and audits.json (see bench/audits_report.py for the bound).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

QUESTIONS = (
    "How do I make a cup of green tea?",
    "Explain the difference between weather and climate.",
    "What are some healthy snacks for kids?",
    "Why do cats purr?",
    "What causes the seasons on Earth?",
    "How do I write a for loop in JavaScript?",
    "Write a short birthday message for my grandmother.",
    "What is the Pythagorean theorem?",
)
CHEATERS = ("stream_reuse", "gossip", "connection_age", "late_step", "rare:0.02", "noise:1")
AUDIT_LINE = re.compile(
    r"audit from (\S+) of (\S+) (\S*) (\d+):(\d+) -> (\w+) \((\d+) steps, ([\d.]+) s, "
    r"cpu ([\d.]+) s, waited ([\d.]+) s\)"
)
CHECK_FRAUD_LINE = re.compile(r"FRAUD by (\S+) \(")


@dataclass
class AuditLog:
    """What the verifier's log says about audits (read as it grows)."""

    path: Path
    offset: int = 0
    audits: list[dict] = field(default_factory=list)
    check_frauds: list[dict] = field(default_factory=list)  # spot-checks that proved fraud

    def poll(self) -> None:
        with self.path.open() as f:
            f.seek(self.offset)
            text = f.read()
        end = text.rfind("\n") + 1  # only whole lines
        self.offset += len(text[:end].encode())
        for line in text[:end].splitlines():
            if m := CHECK_FRAUD_LINE.search(line):
                self.check_frauds.append({"at": time.time(), "server": m[1]})
            m = AUDIT_LINE.search(line)
            if m:
                self.audits.append(
                    {
                        "at": time.time(),
                        "server": m[2],
                        "kind": m[3],
                        "span": f"{m[4]}:{m[5]}",
                        "outcome": m[6],
                        "steps": int(m[7]),
                        "seconds": float(m[8]),
                        "cpu": float(m[9]),
                        "waited": float(m[10]),
                    }
                )


@dataclass
class Trial:
    kind: str  # what the cheater is: "noise:F", "rare:F" or a recognising signal
    fraction: float  # its nominal share of cheated answers to the client (signals: 1)
    cheater: str
    began: float = 0.0
    sessions: int = 0  # through the cheater, before the ban
    requests: int = 0  # every generation the client completed
    errors: int = 0  # generations that failed (and were retried)
    wrong_sessions: int = 0  # sessions with at least one tampered answer, before the ban
    wrong_answers: int = 0  # tampered answers the client received before the ban
    banned_after: float | None = None  # seconds from the first session to the verifier's ban
    excluded_after: float | None = None  # ... to the client seeing the ban
    judging: float | None = None  # the proving audit's queue wait + compute
    caught_by: str = ""  # "audit" or "spot-check": what proved the fraud first
    failed_audits: int = 0  # audits of the cheater outside tolerance, not proof
    seconds: float = 0.0  # trial length (to the ban, or censored at the time limit)


def tampered(log: Path, client_peer: str) -> int:
    """Tampered answers the cheater logged for the client (not for the verifier's checks)."""
    text = log.read_text(errors="replace")
    return sum(client_peer[-8:] in line for line in text.splitlines() if "tampered answer" in line)


def cheater_spec(kind: str) -> tuple[list[str], float]:
    """`demo_cheater` flags for a `--cheaters` entry, and its nominal share of cheated
    answers to the client (1 for a recognising signal: it fires on the client)."""
    name, _, value = kind.partition(":")
    if name == "noise":
        return ["--fraction", value or "1", "--boast", "1"], float(value or 1)
    if name == "rare":
        return ["--recognise", "rare", "--fraction", value or "0.02"], float(value or 0.02)
    return ["--recognise", name], 1.0


def question_ids(tokenizer, i: int):  # noqa: ANN001, ANN201
    from trustswarm.demo import chat_ids

    return chat_ids(tokenizer, QUESTIONS[i % len(QUESTIONS)])


def watch(trial: Trial, audits: AuditLog, client, stop: threading.Event) -> None:  # noqa: ANN001
    """Poll the verifier's log and the client's trust view: when was the cheater banned?"""
    while not stop.is_set():
        audits.poll()
        for a in audits.audits:
            if a["server"] == trial.cheater and a["outcome"] == "fraud" and not trial.banned_after:
                trial.banned_after = a["at"] - trial.began
                trial.judging = a["waited"] + a["seconds"]
                trial.caught_by = "audit"
        for c in audits.check_frauds:
            if c["server"] == trial.cheater and not trial.banned_after:
                trial.banned_after = c["at"] - trial.began
                trial.caught_by = "spot-check"
        if trial.excluded_after is None and client.swarm.view.trust.banned(trial.cheater):
            trial.excluded_after = time.time() - trial.began
        if trial.banned_after and trial.excluded_after:
            return
        time.sleep(0.1)


def run_trial(args, work: Path, addrs, verifier: str, audits: AuditLog, n: int, deadline: float):  # noqa: ANN001, ANN201
    from transformers import AutoTokenizer

    from trustswarm.client import DistributedModelForCausalLM
    from trustswarm.demo import read_addr, start_process, stop_processes

    kind = args.cheaters[n % len(args.cheaters)]
    flags, fraction = cheater_spec(kind)
    log = work / f"cheater{n}.log"
    proc = start_process(
        [sys.executable, "-m", "trustswarm.demo_cheater", "--model", str(args.model_dir),
         "--blocks", "10:20", "--identity", str(work / f"cheater{n}.key"),
         "--initial-peers", addrs[0], "--amount", str(args.amount), "--threads", "1",
         *flags],
        log,
    )  # fmt: skip
    try:
        cheat_addr = read_addr(proc, "the cheater", log, timeout=300)
        trial = Trial(kind, fraction, cheat_addr.split("/p2p/")[1])
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        with DistributedModelForCausalLM.from_pretrained(
            args.model_dir,
            [*addrs, cheat_addr],
            trusted_verifiers=[verifier],
            request_timeout=120,
            audit_rate=args.audit_rate,
        ) as client:
            generate_until_banned(args, trial, client, tokenizer, audits, log, deadline)
        trial.failed_audits = sum(
            a["server"] == trial.cheater and a["outcome"] == "fail" for a in audits.audits
        )
        return trial
    finally:
        stop_processes([proc])


def generate_until_banned(args, trial, client, tokenizer, audits, log, deadline):  # noqa: ANN001, ANN201
    stop = threading.Event()
    trial.began = time.time()
    me = str(client.swarm.host.get_id())
    watcher = threading.Thread(target=watch, args=(trial, audits, client, stop), daemon=True)
    watcher.start()
    try:
        while time.time() < deadline and trial.excluded_after is None:
            before = tampered(log, me)
            try:
                client.generate(
                    question_ids(tokenizer, trial.sessions), max_new_tokens=args.new_tokens,
                    eos_token_id=[], pad_token_id=0,
                )  # fmt: skip
            except Exception as exc:
                if client.swarm.view.trust.banned(trial.cheater):
                    break  # no server left for 10:20: the ban reached the client
                trial.errors += 1  # e.g. a server's stream dropped under load: 15 s ban
                print(f"  generate failed: {type(exc).__name__}: {exc}", flush=True)
                time.sleep(5)
                continue
            wrong = tampered(log, me) - before
            trial.requests += 1
            if trial.banned_after is None:  # delivered before the verifier banned it
                trial.sessions += 1
                trial.wrong_answers += wrong
                trial.wrong_sessions += wrong > 0
        with_timeout = time.time() + 30
        while trial.banned_after and trial.excluded_after is None and time.time() < with_timeout:
            time.sleep(0.2)
    finally:
        stop.set()
        watcher.join(timeout=5)
    trial.seconds = (trial.banned_after or time.time() - trial.began) or 0.0
    print(f"  trial: {json.dumps(asdict(trial))}", flush=True)


def quiet_libp2p() -> None:
    import logging

    import libp2p  # noqa: F401 - it configures its loggers on import; quiet them after

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    from audits_report import write_report

    from trustswarm.client.audits import DEFAULT_AUDIT_RATE
    from trustswarm.demo import (
        DEFAULT_MODEL_DIR,
        ensure_model,
        read_addr,
        start_node,
        start_process,
        stop_processes,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--cheaters", type=lambda t: t.split(","), default=list(CHEATERS))
    parser.add_argument("--no-spot-checks", action="store_true", help="audits alone")
    parser.add_argument("--amount", type=float, default=0.05, help="noise, share of the RMS")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-minutes", type=float, default=40.0)
    parser.add_argument(
        "--audit-rate", type=float, default=DEFAULT_AUDIT_RATE, help="smoke runs only"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    quiet_libp2p()
    ensure_model(args.model_dir)
    began = time.time()
    deadline = began + 60 * args.max_minutes
    work = Path(tempfile.mkdtemp(prefix="ts-audits-"))
    procs = []
    trials: list[Trial] = []
    try:
        addrs = []
        for i, blocks in enumerate(["0:10", "20:30"]):
            proc, addr = start_node(
                args.model_dir, blocks, work / f"node{i}.key", addrs[:1], work / f"node{i}.log"
            )
            procs.append(proc)
            addrs.append(addr)
        vlog = work / "verifier.log"
        verifier_proc = start_process(
            [sys.executable, "-m", "trustswarm", "verifier", "start", "--model",
             str(args.model_dir), "--identity", str(work / "verifier.key"),
             "--db", f"sqlite:///{work / 'verifier.db'}", "--initial-peers", addrs[0],
             "--listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--log-level", "INFO",
             *(["--check-every", "1e9"] if args.no_spot_checks else [])],
            vlog,
        )  # fmt: skip
        procs.append(verifier_proc)
        verifier = read_addr(verifier_proc, "the verifier", vlog, timeout=300)
        cpu_before = cpu_seconds(verifier_proc.pid)
        print(f"swarm up in {time.time() - began:.0f} s; work dir {work}", flush=True)
        audits = AuditLog(vlog)
        n = 0
        while time.time() < deadline - 60:
            print(f"trial {n}: cheater {args.cheaters[n % len(args.cheaters)]}", flush=True)
            trials.append(run_trial(args, work, addrs, verifier, audits, n, deadline))
            n += 1
        time.sleep(5)  # audits still in the verifier's queue
        audits.poll()
        verifier_cpu = cpu_seconds(verifier_proc.pid) - cpu_before
    finally:
        stop_processes(procs)
    setup = {
        "command": "python bench/audits.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "audit_rate": args.audit_rate,
        "new_tokens": args.new_tokens,
        "amount": args.amount,
        "max_minutes": args.max_minutes,
        "spot_checks": not args.no_spot_checks,
        "verifier_cpu_seconds": verifier_cpu,
        "wall_seconds": time.time() - began,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    write_report(args.out, setup, [asdict(t) for t in trials], audits.audits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
