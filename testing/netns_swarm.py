"""Testing only: a swarm on the network-namespace test bed (trustswarm.testing.netns).

Block servers run as netns_runner processes (several tiny-model servers each), one per
host; verifiers as real `trustswarm verifier start` processes; clients in this process,
each entered into its host's namespace while it starts (its event-loop thread stays
there). Used by tests/test_multihost.py and bench/scale.py.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trustswarm.testing.netns import TestBed, TestBedError

SERVER_START_TIMEOUT = 120.0  # a runner imports torch, then starts its servers one by one


@dataclass
class RunnerProcess:
    """One netns_runner process: its servers by index and its event stream."""

    host: str
    process: subprocess.Popen
    servers: dict[int, dict] = field(default_factory=dict)  # index -> its last "up" event
    events: queue.Queue = field(default_factory=queue.Queue)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True, name=f"runner-{self.host}").start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "up":
                self.servers[event["index"]] = event
            elif event.get("event") == "down":
                self.servers.pop(event["index"], None)
            elif event.get("event") == "error":
                self.errors.append(event.get("message", ""))
            self.events.put(event)
        self.events.put({"event": "exit"})

    def wait(self, kind: str, timeout: float) -> dict:
        """The next event of `kind` (others are skipped); TestBedError on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                event = self.events.get(timeout=max(0.01, left))
            except queue.Empty:
                raise TestBedError(
                    f"runner on {self.host}: no {kind!r} within {timeout} s"
                ) from None
            if event["event"] == kind:
                return event
            if event["event"] == "exit":
                raise TestBedError(f"runner on {self.host} exited ({self.errors[-3:]})")
            if left <= 0:
                raise TestBedError(f"runner on {self.host}: no {kind!r} within {timeout} s")

    def send(self, cmd: str, index: int = 0) -> None:
        self.process.stdin.write(json.dumps({"cmd": cmd, "index": index}) + "\n")
        self.process.stdin.flush()

    def stop_server(self, index: int, timeout: float = 20.0) -> None:
        self.send("stop", index)
        self.wait("down", timeout)

    def start_server(self, index: int, timeout: float = 60.0) -> dict:
        self.send("start", index)
        return self.wait("up", timeout)

    def stats(self, timeout: float = 10.0) -> dict:
        self.send("stats")
        return self.wait("stats", timeout)


@dataclass
class BedSwarm:
    bed: TestBed
    model: Path
    workdir: Path
    runners: dict[str, RunnerProcess] = field(default_factory=dict)
    bootstrap: list[str] = field(default_factory=list)  # the first servers' multiaddrs

    def start_runner(self, host: str, specs: Sequence[dict]) -> RunnerProcess:
        """Start a runner on `host` with servers `specs` (see netns_runner); returns at once."""
        plan = {
            "model": str(self.model),
            "listen_ip": self.bed.host(host).address,
            "initial_peers": self.bootstrap,
            "servers": list(specs),
        }
        path = self.workdir / f"plan-{host}.json"
        path.write_text(json.dumps(plan))
        process = self.bed.popen(
            host,
            [sys.executable, "-m", "trustswarm.testing.netns_runner", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / f"runner-{host}.log", "w"),  # noqa: SIM115 - child's
            text=True,
        )
        runner = RunnerProcess(host, process)
        self.runners[host] = runner
        return runner

    def start_servers(self, layout: dict[str, Sequence[dict]]) -> None:
        """Start the first host's runner, then the others with its servers as bootstrap."""
        hosts = list(layout)
        first = self.start_runner(hosts[0], layout[hosts[0]])
        first.wait("ready", SERVER_START_TIMEOUT)
        self.bootstrap = [first.servers[i]["addrs"][0] for i in sorted(first.servers)[:3]]
        for host in hosts[1:]:
            self.start_runner(host, layout[host])
        for host in hosts[1:]:
            self.runners[host].wait("ready", SERVER_START_TIMEOUT)

    def servers(self) -> list[dict]:
        """Every running server's "up" event, with its host."""
        return [
            {**event, "host": host}
            for host, runner in self.runners.items()
            for event in runner.servers.values()
        ]

    def start_verifier(self, host: str, name: str, *options: str) -> tuple[subprocess.Popen, str]:
        """`trustswarm verifier start` on `host`; returns the process and its multiaddr."""
        address = self.bed.host(host).address
        argv = [
            sys.executable, "-m", "trustswarm", "verifier", "start",
            "--model", str(self.model), "--identity", str(self.workdir / f"{name}.key"),
            "--db", f"sqlite:///{self.workdir / f'{name}.db'}",
            "--listen", f"/ip4/{address}/tcp/0", "--initial-peers", *self.bootstrap,
            "--threads", "1", "--log-level", "WARNING", *options,
        ]  # fmt: skip
        process = self.bed.popen(
            host,
            argv,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / f"{name}.log", "w"),  # noqa: SIM115 - child's
            text=True,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(line) for line in process.stdout], daemon=True
        ).start()
        try:
            addr = lines.get(timeout=SERVER_START_TIMEOUT).strip()
        except queue.Empty:
            raise TestBedError(f"verifier {name} printed no address") from None
        if "/p2p/" not in addr:
            raise TestBedError(f"verifier {name} printed {addr!r}, not a multiaddr")
        return process, addr
