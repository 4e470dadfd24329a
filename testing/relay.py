"""A TCP relay on loopback that simulates a wide-area link: latency and a bandwidth cap.

    python -m trustswarm.testing.relay --delay-ms 50 --mbit 100 0:127.0.0.1:31330 [0:127.0.0.1:31331 ...]

Each `LISTEN_PORT:TARGET_HOST:TARGET_PORT` spec starts a relay on 127.0.0.1:LISTEN_PORT
(0 = any free port) that forwards every connection to the target. One line per relay,
`LISTEN_PORT TARGET_HOST:TARGET_PORT`, is printed once all listen; SIGTERM / Ctrl-C stops
them cleanly and prints one JSON line of byte counts.

The link model, per relay and per direction (full duplex, shared by the relay's connections):
a chunk read at time t finishes "transmission" at max(t, link free) + len / bytes_per_s,
and is delivered `delay_s` after that. Chunks are in flight concurrently (a pipe with
latency, not stop-and-wait), delivered in order, and the reader does not read faster than
the link transmits, so the sender sees back-pressure through TCP as over a real slow link.
A request/response pair through one relay therefore takes ~2 * delay_s plus transmission.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import trio

CHUNK = 64 * 1024
MAX_CHUNKS_IN_FLIGHT = 4096  # bounds memory: at most 256 MiB queued per direction
LOOPBACK = "127.0.0.1"


def mbit(megabits_per_s: float) -> float:
    """Megabits per second -> bytes per second (100 Mbit/s = 12.5 MB/s)."""
    return megabits_per_s * 1e6 / 8


class RelayError(ValueError):
    """Bad relay parameters."""


@dataclass
class _Link:
    """One direction of a simulated link: serialisation at a fixed rate."""

    bytes_per_s: float | None
    free_at: float = 0.0
    bytes: int = 0

    def transmit(self, size: int, now: float) -> float:
        """When a chunk of `size` bytes read at `now` has been fully sent."""
        self.bytes += size
        if not self.bytes_per_s:
            return now
        self.free_at = max(self.free_at, now) + size / self.bytes_per_s
        return self.free_at


@dataclass
class Relay:
    """Forwards connections from 127.0.0.1:listen_port to target_host:target_port."""

    target_host: str
    target_port: int
    delay_s: float = 0.0
    bytes_per_s: float | None = None
    listen_port: int = 0
    listen_host: str = LOOPBACK
    connections: int = 0
    up: _Link = field(init=False)  # client -> target
    down: _Link = field(init=False)  # target -> client

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise RelayError(f"delay must be a finite number >= 0, got {self.delay_s!r}")
        if self.bytes_per_s is not None and not (
            math.isfinite(self.bytes_per_s) and self.bytes_per_s > 0
        ):
            raise RelayError(f"bandwidth must be > 0 bytes/s, got {self.bytes_per_s!r}")
        if not 0 <= self.listen_port < 65536 or not 0 < self.target_port < 65536:
            raise RelayError(f"bad port: listen {self.listen_port}, target {self.target_port}")
        self.up = _Link(self.bytes_per_s)
        self.down = _Link(self.bytes_per_s)

    @property
    def stats(self) -> dict:
        return {
            "target": f"{self.target_host}:{self.target_port}",
            "connections": self.connections,
            "bytes_up": self.up.bytes,
            "bytes_down": self.down.bytes,
        }

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and relay until cancelled; reports the bound port through task_status."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, host=self.listen_host), self._handle, self.listen_port
            )
            task_status.started(listeners[0].socket.getsockname()[1])

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            target = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, target, trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, target, self.up, nursery.cancel_scope)
            nursery.start_soon(self._pipe, target, client, self.down, nursery.cancel_scope)

    async def _pipe(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        link: _Link,
        connection: trio.CancelScope,
    ) -> None:
        """Read chunks, hold each for the link's delay, write them in order."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](MAX_CHUNKS_IN_FLIGHT)

        async def reader() -> None:
            async with send:
                while data := await src.receive_some(CHUNK):
                    sent_at = link.transmit(len(data), trio.current_time())
                    await send.send((sent_at + self.delay_s, data))
                    await trio.sleep_until(sent_at)  # the link is busy until then

        async def writer() -> None:
            async with receive:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await dst.send_all(data)
            await dst.send_eof()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                nursery.start_soon(writer)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            connection.cancel()  # one side reset: drop the whole connection


async def run_relay(
    listen_port: int,
    target_host: str,
    target_port: int,
    delay_s: float,
    bytes_per_s: float | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One relay until cancelled; `await nursery.start(run_relay, ...)` returns the port."""
    relay = Relay(target_host, target_port, delay_s, bytes_per_s, listen_port)
    await relay.serve(task_status=task_status)


# -- running relays beside a synchronous benchmark -----------------------------------------


class RelayThread:
    """Relays in a background thread (tests; light traffic). `with RelayThread(...) as t`."""

    def __init__(
        self,
        targets: Sequence[tuple[str, int]],
        delay_s: float,
        bytes_per_s: float | None = None,
    ) -> None:
        self.relays = [Relay(h, p, delay_s, bytes_per_s) for h, p in targets]
        self.ports: list[int] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="relays", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    for relay in self.relays:
                        self.ports.append(await nursery.start(relay.serve))
                    self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to the caller of __enter__
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> RelayThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or len(self.ports) != len(self.relays):
            raise RelayError(f"relays did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._scope is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)


class RelayProcess:
    """Relays in a subprocess, so their timing does not share the caller's GIL (benchmarks).

    `with RelayProcess([(host, port), ...], delay_s=0.05, bytes_per_s=mbit(100)) as r:`
    then `r.ports[i]` relays to the i-th target; `r.stats` holds byte counts after exit.
    """

    def __init__(
        self,
        targets: Sequence[tuple[str, int]],
        delay_s: float,
        bytes_per_s: float | None = None,
        listen_ports: Sequence[int] | None = None,
    ) -> None:
        self.listen_ports = list(listen_ports or [0] * len(targets))
        if len(self.listen_ports) != len(targets):
            raise RelayError("one listen port per target")
        for (host, port), listen in zip(targets, self.listen_ports, strict=True):
            Relay(host, port, delay_s, bytes_per_s, listen)  # validate here, not in the child
        self.targets = list(targets)
        self.delay_s = delay_s
        self.bytes_per_s = bytes_per_s
        self.ports: list[int] = []
        self.stats: list[dict] = []
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RelayProcess:
        cmd = [
            sys.executable,
            "-m",
            "trustswarm.testing.relay",
            "--delay-ms",
            str(self.delay_s * 1e3),
        ]
        if self.bytes_per_s:
            cmd += ["--bytes-per-s", str(self.bytes_per_s)]
        cmd += [
            f"{listen}:{host}:{port}"
            for (host, port), listen in zip(self.targets, self.listen_ports, strict=True)
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for _ in self.targets:
            line = self.proc.stdout.readline().split()
            if not line:
                self.__exit__()
                raise RelayError("relay process exited before listening")
            self.ports.append(int(line[0]))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        for line in out.splitlines():
            if line.startswith("["):
                self.stats = json.loads(line)
        self.proc = None


# -- command line ----------------------------------------------------------------------


def parse_spec(text: str) -> tuple[int, str, int]:
    try:
        listen, host, port = text.rsplit(":", 2)
        return int(listen), host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LISTEN_PORT:TARGET_HOST:TARGET_PORT, got {text!r}"
        ) from None


async def _main(relays: list[Relay]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for relay in relays:
                port = await nursery.start(relay.serve)
                print(port, f"{relay.target_host}:{relay.target_port}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", type=parse_spec, metavar="LISTEN:HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--mbit", type=float, default=None, help="bandwidth cap, Mbit/s")
    rate.add_argument("--bytes-per-s", type=float, default=None, help="bandwidth cap, B/s")
    args = parser.parse_args(argv)
    bytes_per_s = mbit(args.mbit) if args.mbit else args.bytes_per_s
    try:
        relays = [
            Relay(host, port, args.delay_ms / 1e3, bytes_per_s, listen)
            for listen, host, port in args.specs
        ]
    except RelayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trio.run(_main, relays)
    print(json.dumps([r.stats for r in relays]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
