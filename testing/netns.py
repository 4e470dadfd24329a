"""Testing only: a multi-host test bed on one Linux machine (network namespaces).

Each "host" is a network namespace with one veth whose other end sits on a bridge in a
namespace of its own, so the root namespace's interfaces and routes are never touched.
Host i gets 198.18.<i+1>.1/15 (the benchmarking range, RFC 2544): all hosts share one
segment, and each has its own /24, which is what replica diversity counts.

Needs root and `ip` (iproute2). Per-host bandwidth uses `tc tbf`, delay and loss `tc
netem`, each only where the kernel has it (`TestBed.shaping` says which). Processes run
inside a host with `ip netns exec`; code in this process can enter a host for a while
(`TestBed.inside`): threads started inside (e.g. a client's event loop) stay there.

Cleanup always runs: `close()` (context manager and atexit) kills the processes it
started and deletes its namespaces; a new bed also deletes what a crashed earlier run
with the same prefix left behind (namespaces named after a process that is gone).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from trustswarm.protocol.errors import TrustswarmError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MAX_HOSTS = 250  # one /24 each inside 198.18.0.0/15, .1 to .250
BRIDGE = "br0"
PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{1,11}$")
COMMAND_TIMEOUT = 20.0


class TestBedError(TrustswarmError):
    """The test bed cannot be built or used here (not root, no netns, bad argument)."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class LinkShape:
    """Per-host link shaping; None leaves that aspect alone."""

    delay_ms: float | None = None
    loss_percent: float | None = None
    rate_mbit: float | None = None

    def __post_init__(self) -> None:
        for name, value, high in (
            ("delay_ms", self.delay_ms, 60_000.0),
            ("loss_percent", self.loss_percent, 100.0),
            ("rate_mbit", self.rate_mbit, 100_000.0),
        ):
            if value is None:
                continue
            if not isinstance(value, int | float) or not 0.0 <= float(value) <= high:
                raise TestBedError(f"{name} must be a number in [0, {high:g}], got {value!r}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise TestBedError("rate_mbit must be positive")


@dataclass(frozen=True)
class Shaping:
    """What link shaping this kernel offers."""

    tbf: bool  # bandwidth
    netem: bool  # delay and loss

    def describe(self) -> str:
        have = [
            n
            for n, ok in (("tbf (bandwidth)", self.tbf), ("netem (delay, loss)", self.netem))
            if ok
        ]
        missing = [n for n, ok in (("tbf", self.tbf), ("netem", self.netem)) if not ok]
        text = "shaping: " + (", ".join(have) if have else "none")
        return text + (f"; the kernel lacks {', '.join(missing)}" if missing else "")


def run_ip(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS` (or `tc` when args[0] == "tc"); TestBedError with its stderr on failure."""
    argv = list(args) if args and args[0] == "tc" else ["ip", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestBedError(f"{' '.join(argv)}: {exc}") from None
    if check and done.returncode != 0:
        raise TestBedError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.returncode}")
    return done


def unavailable_reason() -> str | None:
    """Why no test bed can be built here, or None when it can."""
    if os.geteuid() != 0:
        return "the network-namespace test bed needs root"
    if shutil.which("ip") is None:
        return "the network-namespace test bed needs `ip` (Debian package iproute2)"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    probe = f"tsprobe{os.getpid()}"
    made = run_ip(["netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        veth = run_ip(
            ["-n", probe, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb"],
            check=False,
        )
        bridge = run_ip(["-n", probe, "link", "add", "name", "vbr", "type", "bridge"], check=False)
    finally:
        run_ip(["netns", "delete", probe], check=False)
    if veth.returncode != 0:
        return f"no veth pairs: {veth.stderr.strip()}"
    if bridge.returncode != 0:
        return f"no bridges: {bridge.stderr.strip()}"
    return None


def probe_shaping(namespace: str, device: str) -> Shaping:
    """Try each qdisc on `device` once and remove it again."""

    def works(*qdisc: str) -> bool:
        ok = run_ip(["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", *qdisc], False)
        run_ip(["tc", "-n", namespace, "qdisc", "del", "dev", device, "root"], check=False)
        return ok.returncode == 0

    return Shaping(
        tbf=works("tbf", "rate", "100mbit", "burst", "64kb", "latency", "50ms"),
        netem=works("netem", "delay", "1ms"),
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(prefix: str) -> list[str]:
    """Delete namespaces `<prefix>-<pid>-*` whose creating process is gone, after killing
    what still runs inside them (a bed's own servers and verifiers, orphaned)."""
    listing = run_ip(["netns", "list"], check=False).stdout
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-\S+")
    removed = []
    for line in listing.splitlines():
        match = pattern.match(line.strip())
        if match and not _pid_alive(int(match.group(1))):
            name = line.split()[0]
            for pid in run_ip(["netns", "pids", name], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run_ip(["netns", "delete", name], check=False)
            removed.append(name)
    return removed


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL when the thread that started it exits, so a test
    process killed outright leaves no servers behind (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _setns(path: Path | str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise TestBedError(f"setns({path}) failed: {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    name: str  # the caller's name for it
    namespace: str
    address: str  # its IPv4 address, e.g. 198.18.1.1
    bridge_port: str  # its veth's other end, on the bridge


@dataclass
class TestBed:
    """`hosts` network namespaces on one bridge; use as a context manager."""

    __test__ = False

    host_names: Sequence[str]
    prefix: str = "tsbed"
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)
    shaping: Shaping = Shaping(tbf=False, netem=False)
    _closed: bool = False

    def __post_init__(self) -> None:
        if not PREFIX_PATTERN.match(self.prefix):
            raise TestBedError(f"prefix must match {PREFIX_PATTERN.pattern}, got {self.prefix!r}")
        names = list(self.host_names)
        if not 1 <= len(names) <= MAX_HOSTS or len(set(names)) != len(names):
            raise TestBedError(f"need 1-{MAX_HOSTS} distinct host names, got {len(names)}")
        for name in names:
            if not re.fullmatch(r"[a-z0-9]{1,16}", name):
                raise TestBedError(f"host names are 1-16 of [a-z0-9], got {name!r}")
        reason = unavailable_reason()
        if reason:
            raise TestBedError(reason)
        remove_leftovers(self.prefix)
        self.bridge_ns = f"{self.prefix}-{os.getpid()}-bridge"
        atexit.register(self.close)
        try:
            self._build(names)
        except BaseException:
            self.close()
            raise

    def _build(self, names: list[str]) -> None:
        run_ip(["netns", "add", self.bridge_ns])
        run_ip(["-n", self.bridge_ns, "link", "add", "name", BRIDGE, "type", "bridge"])
        run_ip(["-n", self.bridge_ns, "link", "set", BRIDGE, "up"])
        for i, name in enumerate(names):
            namespace = f"{self.prefix}-{os.getpid()}-{name}"
            host = Host(name, namespace, f"198.18.{i + 1}.1", f"p{i}")
            run_ip(["netns", "add", namespace])
            self.hosts[name] = host
            run_ip(
                ["-n", namespace, "link", "add", "name", "eth0", "type", "veth", "peer", "name",
                 host.bridge_port, "netns", self.bridge_ns]
            )  # fmt: skip
            run_ip(["-n", self.bridge_ns, "link", "set", host.bridge_port, "master", BRIDGE])
            run_ip(["-n", self.bridge_ns, "link", "set", host.bridge_port, "up"])
            run_ip(["-n", namespace, "addr", "add", f"{host.address}/15", "dev", "eth0"])
            run_ip(["-n", namespace, "link", "set", "eth0", "up"])
            run_ip(["-n", namespace, "link", "set", "lo", "up"])
        first = self.hosts[names[0]]
        self.shaping = probe_shaping(first.namespace, "eth0")

    def __enter__(self) -> TestBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            raise TestBedError(f"no host {name!r} in this test bed")
        return self.hosts[name]

    def shape(self, name: str, shape: LinkShape) -> None:
        """Shape the host's outgoing traffic; refuses what this kernel cannot do."""
        host = self.host(name)
        wants_netem = shape.delay_ms is not None or shape.loss_percent is not None
        if wants_netem and not self.shaping.netem:
            raise TestBedError(
                f"delay/loss need tc netem, which this kernel lacks ({self.shaping.describe()})"
            )
        if shape.rate_mbit is not None and not self.shaping.tbf:
            raise TestBedError(f"bandwidth needs tc tbf ({self.shaping.describe()})")
        tc = ["tc", "-n", host.namespace, "qdisc"]
        run_ip([*tc, "del", "dev", "eth0", "root"], check=False)
        parent = ["root"]
        if wants_netem:
            netem = ["netem"]
            if shape.delay_ms is not None:
                netem += ["delay", f"{shape.delay_ms}ms"]
            if shape.loss_percent is not None:
                netem += ["loss", f"{shape.loss_percent}%"]
            run_ip([*tc, "add", "dev", "eth0", "root", "handle", "1:", *netem])
            parent = ["parent", "1:"]
        if shape.rate_mbit is not None:
            run_ip(
                [*tc, "add", "dev", "eth0", *parent, "tbf", "rate", f"{shape.rate_mbit}mbit",
                 "burst", "64kb", "latency", "100ms"]
            )  # fmt: skip

    def cut(self, name: str) -> None:
        """Take the host's link off the bridge: its packets are dropped, both ways."""
        run_ip(["-n", self.bridge_ns, "link", "set", self.host(name).bridge_port, "down"])

    def restore(self, name: str) -> None:
        run_ip(["-n", self.bridge_ns, "link", "set", self.host(name).bridge_port, "up"])

    def popen(self, name: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """Start `argv` inside the host (killed by close(), and when the calling thread
        exits: call it from a thread that outlives the process, e.g. the main one)."""
        host = self.host(name)
        process = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, *argv],
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
            **kwargs,
        )
        self.processes.append(process)
        return process

    @contextmanager
    def inside(self, name: str) -> Iterator[Host]:
        """Run this thread in the host's namespace for the block. Sockets made and threads
        started in the block stay in that namespace after it."""
        host = self.host(name)
        original = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        try:
            _setns(NETNS_DIR / host.namespace)
            try:
                yield host
            finally:
                _setns(f"/proc/self/fd/{original}")
        finally:
            os.close(original)

    def stop(self, process: subprocess.Popen, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, then SIGKILL after `timeout` seconds."""
        if process.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        return process.poll()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for process in self.processes:
            self.stop(process, timeout=5.0)
        for host in self.hosts.values():
            run_ip(["netns", "delete", host.namespace], check=False)
        run_ip(["netns", "delete", self.bridge_ns], check=False)
        atexit.unregister(self.close)
