"""Processes for the performance table: block servers, relays, a verifier, client workers.

Every server is a real `trustswarm node start --threads 1` process on 127.0.0.1, as in
demo.py. `Servers(..., wan=(delay_s, bytes_per_s))` puts each server behind its own
relay process (trustswarm/testing/relay.py) and makes it announce the relay's address
(`--announce-addr`), so clients reach the servers only through the simulated link.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trustswarm.demo import stop_processes
from trustswarm.testing.relay import RelayProcess

PY = [sys.executable, "-m", "trustswarm"]
LOOPBACK = "127.0.0.1"
_CHECK_LINE = re.compile(r"check \S+ \S+ \d+:\d+ -> (\w+)")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (bound and released at once)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def first_addr(proc: subprocess.Popen, what: str, log: Path, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("/ip4/"):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{what} failed to start; see {log}")


@dataclass
class Servers:
    """Block servers for `spans` (e.g. ["0:10", "10:20", "20:30"] * k), optionally behind
    WAN relays. `launch()` then `join()` (several swarms can start side by side), or use
    as a context manager; `client_peers` are the addresses to give clients."""

    model_dir: Path
    work: Path
    spans: list[str]
    wan: tuple[float, float | None] | None = None  # (one-way delay s, bytes/s)
    procs: list[subprocess.Popen] = field(default_factory=list)
    addrs: list[str] = field(default_factory=list)  # listen addresses, full
    client_peers: list[str] = field(default_factory=list)
    relay: RelayProcess | None = None
    verifier: subprocess.Popen | None = None
    _listen: list[str] = field(default_factory=list)
    _announce: list[str | None] = field(default_factory=list)
    _logs: list[Path] = field(default_factory=list)

    def _spawn(self, i: int, initial: list[str]) -> None:
        cmd = [*PY, "node", "start", "--model", str(self.model_dir), "--blocks", self.spans[i]]
        cmd += ["--identity", str(self.work / f"node{i}.key"), "--listen", self._listen[i]]
        cmd += ["--threads", "1", "--log-level", "WARNING"]
        if self._announce[i]:
            cmd += ["--announce-addr", self._announce[i]]
        cmd += ["--initial-peers", *initial] if initial else ["--new-swarm"]
        log = self.work / f"node{i}.log"
        self.procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        )
        self._logs.append(log)

    def launch(self) -> None:
        """Start the relays (if any) and the first server."""
        self.work.mkdir(parents=True, exist_ok=True)
        n = len(self.spans)
        self._announce = [None] * n
        self._listen = ["/ip4/127.0.0.1/tcp/0"] * n
        if self.wan:
            ports = free_ports(2 * n)
            server_ports, relay_ports = ports[:n], ports[n:]
            self._listen = [f"/ip4/127.0.0.1/tcp/{p}" for p in server_ports]
            self._announce = [f"/ip4/127.0.0.1/tcp/{p}" for p in relay_ports]
            self.relay = RelayProcess(
                [(LOOPBACK, p) for p in server_ports], *self.wan, listen_ports=relay_ports
            ).__enter__()
        self._spawn(0, [])

    def join(self) -> None:
        """Wait for the first server, start the others, wait for them."""
        self.addrs.append(first_addr(self.procs[0], "server 0", self._logs[0]))
        for i in range(1, len(self.spans)):
            self._spawn(i, self.addrs[:1])
        for i in range(1, len(self.spans)):
            self.addrs.append(first_addr(self.procs[i], f"server {i}", self._logs[i]))
        peer = self.addrs[0].split("/p2p/")[1]
        self.client_peers = [f"{self._announce[0]}/p2p/{peer}" if self.wan else self.addrs[0]]

    def extend(self, spans: list[str]) -> None:
        """Start more servers in this swarm (e.g. replicas for redundancy) and wait for them."""
        first = len(self.spans)
        self.spans += spans
        self._listen += ["/ip4/127.0.0.1/tcp/0"] * len(spans)
        self._announce += [None] * len(spans)
        for i in range(first, len(self.spans)):
            self._spawn(i, self.addrs[:1])
        for i in range(first, len(self.spans)):
            self.addrs.append(first_addr(self.procs[i], f"server {i}", self._logs[i]))

    def __enter__(self) -> Servers:
        try:
            self.launch()
            self.join()
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_verifier(self) -> None:
        log = self.work / "verifier.log"
        cmd = [*PY, "verifier", "start", "--model", str(self.model_dir)]
        cmd += ["--identity", str(self.work / "verifier.key")]
        cmd += ["--db", f"sqlite:///{self.work / 'verifier.db'}"]
        cmd += ["--listen", "/ip4/127.0.0.1/tcp/0", "--log-level", "INFO"]
        cmd += ["--initial-peers", *self.addrs[:3]]
        self.verifier = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True
        )
        first_addr(self.verifier, "verifier", log)

    def stop_verifier(self) -> None:
        if self.verifier is not None:
            stop_processes([self.verifier], timeout=20)
            self.verifier = None

    def verifier_summary(self) -> str:
        """What the verifier's log says it checked (outcome counts)."""
        log = self.work / "verifier.log"
        text = log.read_text() if log.is_file() else ""
        outcomes = Counter(m.group(1) for m in _CHECK_LINE.finditer(text))
        if not outcomes:
            return "the verifier logged no completed spot-check during the run"
        counts = ", ".join(f"{n} {outcome}" for outcome, n in outcomes.most_common())
        return f"spot-checks completed while the servers were up: {counts}"

    @property
    def pids(self) -> list[int]:
        pids = [p.pid for p in self.procs]
        pids += [self.verifier.pid] if self.verifier else []
        return pids + ([self.relay.proc.pid] if self.relay and self.relay.proc else [])

    def __exit__(self, *exc: object) -> None:
        stop_processes(self.procs + ([self.verifier] if self.verifier else []), timeout=20)
        self.verifier = None
        if self.relay is not None:
            self.relay.__exit__()


def stop_all(groups: list[Servers]) -> None:
    """Stop several swarms at once (SIGTERM to all, then wait)."""
    procs = [p for g in groups for p in g.procs + ([g.verifier] if g.verifier else [])]
    stop_processes(procs, timeout=20)
    for group in groups:
        group.verifier = None
        if group.relay is not None:
            group.relay.__exit__()


def verifier_available() -> str | None:
    """None if `trustswarm verifier start` exists, else why not."""
    result = subprocess.run(
        [*PY, "verifier", "start", "--help"], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        return (result.stderr.strip().splitlines() or ["no `verifier start` command"])[-1]
    return None


# -- concurrent clients: one process each ----------------------------------------------


class ClientWorkers:
    """N client processes (`bench/table_client.py`), each with its own swarm client.

    `run(column)` makes all of them measure `column` at the same moment."""

    def __init__(self, n: int, model_dir: Path, peers: list[str], spec: dict, work: Path) -> None:
        script = Path(__file__).with_name("table_client.py")
        args = json.dumps({"model_dir": str(model_dir), "peers": peers, **spec})
        work.mkdir(parents=True, exist_ok=True)
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(script), args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=(work / f"client{i}.log").open("w"),
                text=True,
            )
            for i in range(n)
        ]
        try:
            for proc in self.procs:
                self._answer(proc)  # "ready" after connecting and a warm-up
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _answer(proc: subprocess.Popen) -> dict:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"client worker {proc.pid} exited ({proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"client worker {proc.pid}: {answer['error']}")
        return answer

    def run(self, column: str, seed: int) -> tuple[list[list[float]], list[float], float]:
        """Each client's values (one per repeat); the aggregate rate of each repeat (all
        clients' units over the span from the first client's start to the last one's end);
        the wall time of the whole round."""
        began = time.perf_counter()
        for i, proc in enumerate(self.procs):
            proc.stdin.write(json.dumps({"column": column, "seed": seed * 100 + i}) + "\n")
            proc.stdin.flush()
        answers = [self._answer(proc) for proc in self.procs]
        aggregate = []
        for spans in zip(*(a["spans"] for a in answers), strict=True):
            start, end = min(s[0] for s in spans), max(s[1] for s in spans)
            aggregate.append(sum(s[2] for s in spans) / (end - start))
        return [a["values"] for a in answers], aggregate, time.perf_counter() - began

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None and proc.stdin:
                try:
                    proc.stdin.close()  # EOF: the worker closes its client and exits
                except OSError:
                    pass
        stop_processes(self.procs, timeout=20)
