"""trustswarm/testing/relay.py: a latency + bandwidth relay, with real sockets on loopback."""

from __future__ import annotations

import os
import socket
import statistics
import time
from functools import partial

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trustswarm.testing.relay import (
    Relay,
    RelayError,
    RelayProcess,
    RelayThread,
    parse_spec,
    run_relay,
)

pytestmark = pytest.mark.timeout(60)


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def sink(stream: trio.SocketStream) -> None:
    """Counts bytes until EOF, then answers with the count."""
    total = 0
    async with stream:
        while data := await stream.receive_some(65536):
            total += len(data)
        await stream.send_all(str(total).encode())


async def start(nursery: trio.Nursery, handler, delay: float, rate: float | None = None) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    port = listeners[0].socket.getsockname()[1]
    return await nursery.start(run_relay, 0, "127.0.0.1", port, delay, rate)


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = await stream.receive_some(size - len(buf))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {size} bytes")
        buf += data
    return bytes(buf)


def test_round_trip_is_twice_the_delay():
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await start(nursery, echo, delay=0.05)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            rtts = []
            for i in range(5):
                began = trio.current_time()
                await stream.send_all(b"ping%d" % i)
                assert await receive_exactly(stream, 5) == b"ping%d" % i
                rtts.append(trio.current_time() - began)
            assert 0.099 <= statistics.median(rtts) < 0.2, rtts
            await stream.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_chunks_are_in_flight_together_not_stop_and_wait():
    """Messages sent 13 ms apart each take ~1 RTT. A relay that held one chunk at a time
    would make most of the ones arriving during its wait take 1.5 to 2 RTTs."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await start(nursery, echo, delay=0.1)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            sent: dict[bytes, float] = {}
            rtts: list[float] = []
            order: list[bytes] = []

            async def read() -> None:
                buf = b""
                while len(order) < 10:
                    buf += await stream.receive_some(100)
                    while len(buf) >= 3:
                        msg, buf = buf[:3], buf[3:]
                        order.append(msg)
                        rtts.append(trio.current_time() - sent[msg])

            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                for i in range(10):
                    sent[b"m%02d" % i] = trio.current_time()
                    await stream.send_all(b"m%02d" % i)
                    await trio.sleep(0.013)
            assert order == [b"m%02d" % i for i in range(10)]
            assert min(rtts) >= 0.199, rtts
            assert statistics.median(rtts) < 0.25, rtts
            assert sum(r > 0.3 for r in rtts) <= 2, rtts  # hiccups allowed on a busy host
            await stream.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_large_transfer_arrives_intact_in_order_and_eof_passes_through():
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await start(nursery, echo, delay=0.005)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            received = bytearray()

            async def read_all() -> None:
                while data := await stream.receive_some(65536):
                    received.extend(data)

            async with trio.open_nursery() as inner:
                inner.start_soon(read_all)
                await stream.send_all(payload)
                await stream.send_eof()  # echo server sees EOF, closes, we see EOF
            assert bytes(received) == payload
            await stream.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_bandwidth_cap_limits_throughput():
    rate = 4e6  # bytes/s
    size = 2_000_000

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await start(nursery, sink, delay=0.01, rate=rate)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            began = trio.current_time()
            await stream.send_all(b"x" * size)
            await stream.send_eof()
            answer = await stream.receive_some(64)
            seconds = trio.current_time() - began
            assert int(answer) == size
            expected = size / rate + 0.02
            assert 0.9 * expected <= seconds < 2.0 * expected, seconds  # uncapped: ~0.01 s
            await stream.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_cancelling_the_relay_closes_its_connections_and_frees_the_port():
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), echo, 0)
            target = listeners[0].socket.getsockname()[1]
            relay = Relay("127.0.0.1", target, delay_s=0.001)
            scope = trio.CancelScope()

            async def run(task_status) -> None:
                with scope:
                    await relay.serve(task_status=task_status)

            port = await nursery.start(run)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"hi")
            assert await receive_exactly(stream, 2) == b"hi"
            scope.cancel()
            with trio.fail_after(5):
                try:
                    assert await stream.receive_some(10) == b""
                except trio.BrokenResourceError:
                    pass  # a reset is also a clean end for the client
            await stream.aclose()
            await trio.sleep(0.05)
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            assert relay.stats["bytes_up"] == 2 and relay.stats["connections"] == 1
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_unreachable_target_closes_the_client_connection():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(run_relay, 0, "127.0.0.1", dead, 0.0)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(5):
                try:
                    assert await stream.receive_some(10) == b""
                except trio.BrokenResourceError:
                    pass
            nursery.cancel_scope.cancel()

    trio.run(main)


def _blocking_echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))
    return server, server.getsockname()[1]


def _echo_once(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


@pytest.mark.parametrize("kind", [RelayThread, RelayProcess])
def test_background_relays_for_synchronous_benchmarks(kind):
    import threading

    server, port = _blocking_echo_server()
    with server:
        threading.Thread(target=_echo_once, args=(server,), daemon=True).start()
        with kind([("127.0.0.1", port)], delay_s=0.03) as relays:
            with socket.create_connection(("127.0.0.1", relays.ports[0]), timeout=5) as c:
                began = time.monotonic()
                c.sendall(b"hello")
                assert c.recv(5) == b"hello"
                assert 0.059 <= time.monotonic() - began < 0.4
    if kind is RelayProcess:
        assert relays.stats[0]["bytes_up"] == 5 and relays.stats[0]["bytes_down"] == 5


@pytest.mark.parametrize(
    "kwargs", [{"delay_s": -1}, {"delay_s": float("nan")}, {"bytes_per_s": 0}, {"target_port": 0}]
)
def test_bad_parameters_are_refused(kwargs):
    args = {"target_host": "127.0.0.1", "target_port": 1, "delay_s": 0.0} | kwargs
    with pytest.raises(RelayError):
        Relay(**args)


@given(
    st.integers(0, 65535), st.from_regex(r"[a-z0-9.]{1,20}", fullmatch=True), st.integers(1, 65535)
)
def test_spec_parser_round_trips(listen, host, port):
    assert parse_spec(f"{listen}:{host}:{port}") == (listen, host, port)


@pytest.mark.parametrize("text", ["", "1:2", "a:b:c", "1:host:", "x:host:1"])
def test_spec_parser_refuses_garbage(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_spec(text)
