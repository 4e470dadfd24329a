"""Faults and load (issue 6 section 3), each bounded in time, on the tiny model:

* servers killed and restarted during generation: the output does not change;
* malformed and oversized frames against every RPC (info, forward, backward,
  inference, the verifier's report and audit desks), hypothesis-driven: every node keeps serving
  and the process's memory stays bounded;
* 8 concurrent clients x 64 tokens: zero errors, every output equals the local model's;
* a flood of session opens beyond max_sessions: clear busy errors, no crash, memory
  bounded, every slot released;
* the verifier killed: clients keep using its unexpired records (its restart with
  history intact is tests/test_verifier_restart.py).

The servers run in this process (tests/swarm.py), so "memory" is this process's RSS.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.custom_types import TProtocol
from transformers import AutoModelForCausalLM

from tests.adversary import Tamper, adversarial_server_cls
from tests.verifier_env import start_verifier, stop_verifier, wait_until
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.node.config import ServerConfig
from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message, decode_message, encode_message
from trustswarm.protocol.framing import read_frame, write_frame
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host
from trustswarm.testing.local_swarm import LocalSwarm, RunningServer
from trustswarm.verifier.config import AuditConfig
from trustswarm.verifier.daemon import VerifierConfig
from trustswarm.verifier.reports import ReportConfig
from trustswarm.verifier.spotcheck import FRAUD, PASS, CheckConfig

pytestmark = pytest.mark.timeout(120)

PAGE = os.sysconf("SC_PAGE_SIZE")
RPCS = [protocols.INFO, protocols.FORWARD, protocols.BACKWARD, protocols.INFERENCE]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


@pytest.fixture(scope="module")
def local_model(tiny_model_dir: Path):
    hf = tiny_model_dir.parent / "hf"
    return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()


def expected_tokens(local_model, ids: torch.Tensor, new: int) -> list[int]:
    with torch.no_grad():
        out = local_model.generate(
            ids,
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=[],
            pad_token_id=0,
            attention_mask=torch.ones_like(ids),
        )
    return out[0].tolist()


# -- kill and restart during generation ------------------------------------------------


class Chaos:
    """A generate() streamer that kills and starts servers at given token counts."""

    def __init__(self, swarm: LocalSwarm, plan: dict[int, tuple[str, tuple[int, int]]]) -> None:
        self.swarm, self.plan, self.seen = swarm, plan, 0
        self.killed: list[RunningServer] = []
        self.started: list[RunningServer] = []

    def put(self, tokens: torch.Tensor) -> None:
        if tokens.dim() == 2:  # the prompt: transformers' generate streams it first
            return
        self.seen += 1
        action = self.plan.get(self.seen)
        if action is None:
            return
        what, span = action
        if what == "kill":  # the busiest live server of that span: one on the route
            live = [s for s in self.swarm.servers if s.alive and s.server.span == span]
            victim = max(live, key=lambda s: s.server.ctx.active_sessions)
            self.swarm.kill(victim)
            self.killed.append(victim)
        else:
            self.started.append(self.swarm.start_server(span))

    def end(self) -> None:
        pass


def test_kill_and_restart_servers_during_generation(tiny_model_dir, local_model):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        for span in [(0, 3), (3, 6), (0, 3), (3, 6)]:
            swarm.start_server(span)
        ids = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(21))
        expected = expected_tokens(local_model, ids, 40)
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir, swarm.initial_peers, request_timeout=10
        ) as model:
            chaos = Chaos(
                swarm,
                {
                    4: ("kill", (0, 3)),
                    8: ("start", (0, 3)),
                    14: ("kill", (3, 6)),
                    18: ("start", (3, 6)),
                },
            )
            got = model.generate(ids, max_new_tokens=40, streamer=chaos, eos_token_id=[])
            assert len(chaos.killed) == 2 and len(chaos.started) == 2
            assert got[0].tolist() == expected
            # The client learns the restarted servers on its next refresh (through the
            # surviving peers); then every original goes: the output is still unchanged.
            fresh = {s.peer_id for s in chaos.started}

            def learned() -> bool:
                model.run_async(model.swarm.refresh)
                return fresh <= set(model.swarm.view.servers)

            wait_until(learned, timeout=30, every=0.5)
            for server in swarm.servers:
                if server.alive and server not in chaos.started:
                    swarm.kill(server)
            again = model.generate(ids, max_new_tokens=40, eos_token_id=[])
            assert again[0].tolist() == expected
            assert all(s.server.ctx.served_requests > 0 for s in chaos.started)
    finally:
        swarm.close()


# -- malformed and oversized frames against every RPC ----------------------------------


class BarePeer:
    """A bare libp2p peer kept connected to nodes, in the swarm's loop: sends raw bytes
    on fresh streams and reads the reply (None: the node closed the stream)."""

    def __init__(self, swarm: LocalSwarm, addrs: list[str]) -> None:
        self.swarm = swarm
        self.stop = trio.Event()

        async def run(task_status: trio.TaskStatus) -> None:
            host = make_host(Identity.generate())
            async with running_host(host, []):
                for addr in addrs:
                    await host.connect(parse_peer_addr(addr))
                task_status.started(host)
                await self.stop.wait()

        async def launch():  # noqa: ANN202
            return await swarm.start_task(run)

        self.host = swarm.loop.run(launch)

    def send(self, peer_addr: str, protocol: TProtocol, data: bytes) -> dict[str, str] | None:
        peer = parse_peer_addr(peer_addr).peer_id

        async def run() -> dict[str, str] | None:
            with trio.fail_after(20):
                stream = await self.host.new_stream(peer, [protocol])
                try:
                    await stream.write(data)
                    await stream.close()  # our side is done: a short frame ends here
                    try:
                        reply = await read_frame(stream)
                    except Exception:
                        return None
                    return decode_message(reply).meta
                finally:
                    try:
                        await stream.reset()
                    except Exception:  # noqa: S110 - already closed
                        pass

        return self.swarm.loop.run(run)

    def close(self) -> None:
        async def stop() -> None:
            self.stop.set()
            await trio.sleep(0.05)

        self.swarm.loop.run(stop)


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def tensor_strategy() -> st.SearchStrategy[torch.Tensor]:
    shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4)
    dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool])
    return st.builds(lambda s, d: torch.zeros(s, dtype=d), shapes, dtypes)


META_KEYS = ["start", "end", "session_id", "max_length", "batch_size", "step", "x"]
META_VALUES = st.one_of(
    st.sampled_from(["0", "3", "6", "-1", "99999999999", "nan", "", "s" * 16]),
    st.text(max_size=20),
)
MESSAGES = st.builds(
    lambda tensors, meta: encode_message(Message(tensors, meta)),
    st.dictionaries(
        st.sampled_from(["hidden_states", "grad_outputs", "position_ids", "attention_mask", "y"]),
        tensor_strategy(),
        max_size=4,
    ),
    st.dictionaries(st.sampled_from(META_KEYS), META_VALUES, max_size=6),
)
PAYLOADS = st.one_of(
    st.binary(max_size=64),  # not even a length prefix, or garbage after one
    st.binary(max_size=512).map(frame),  # a frame of garbage
    MESSAGES.map(frame),  # a well-framed message with odd fields and tensors
    MESSAGES.flatmap(lambda m: st.integers(0, len(m)).map(lambda cut: frame(m)[: cut + 4])),
    st.integers(64 * 2**20 + 1, 2**32 - 1).map(lambda n: struct.pack("!I", n)),  # oversized
)


@pytest.fixture(scope="module")
def fuzz_swarm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    swarm = LocalSwarm(tiny_model_dir)
    swarm.target = swarm.start_server((0, 6), config=ServerConfig(request_timeout=5.0))
    db = tmp_path_factory.mktemp("faults") / "v.db"
    quiet = VerifierConfig(
        checks=CheckConfig(check_every=3600.0),
        reports=ReportConfig(max_reports=10_000),  # so every fuzzed frame reaches the parser
        audits=AuditConfig(max_per_window=10_000),
    )
    swarm.verifier = start_verifier(swarm, f"sqlite:///{db}", quiet)
    swarm.peer = BarePeer(swarm, [swarm.target.addrs[0], swarm.verifier.addrs[0]])
    yield swarm
    swarm.peer.close()
    stop_verifier(swarm, swarm.verifier)
    swarm.close()


def still_serves(swarm: LocalSwarm, local_model, tiny_model_dir: Path) -> None:
    ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(4))
    with DistributedModelForCausalLM.from_pretrained(tiny_model_dir, [swarm.target.addrs[0]]) as m:
        with torch.no_grad():
            got = m(input_ids=ids).logits
            ref = local_model(input_ids=ids).logits
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


DESKS = (protocols.REPORT, protocols.AUDIT)  # the verifier's


@pytest.mark.parametrize("protocol", [*RPCS, *DESKS], ids=lambda p: p.split("/")[2])
def test_fuzzed_frames_every_rpc(fuzz_swarm, local_model, tiny_model_dir, protocol):
    swarm = fuzz_swarm
    addr = swarm.verifier.addrs[0] if protocol in DESKS else swarm.target.addrs[0]
    replies: list[dict[str, str] | None] = []

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(payload=PAYLOADS)
    def fuzz(payload: bytes) -> None:
        reply = swarm.peer.send(addr, protocol, payload)
        replies.append(reply)
        if reply is not None and protocol != protocols.INFO:
            # Anything that is not a complete valid request is refused with a clear code.
            assert reply.get("error") in (None, "bad_request", "too_large", "busy"), reply

    before = rss_mb()
    fuzz()
    # Explicitly oversized: a length claim over the 64 MiB cap is refused unread.
    big = swarm.peer.send(addr, protocol, struct.pack("!I", 2**32 - 1) + b"x" * 1024)
    assert big is not None and big["error"] == "too_large", big
    # A large body of garbage inside the cap: read, refused, and its memory released.
    for _ in range(3):
        garbage = swarm.peer.send(addr, protocol, frame(os.urandom(8 * 2**20)))
        assert garbage is None or garbage.get("error") in ("bad_request", "too_large"), garbage
    growth = rss_mb() - before
    assert growth < 150, f"RSS grew by {growth:.0f} MiB"
    assert any(r is not None and "error" in r for r in replies)
    if protocol in DESKS:
        info = swarm.peer.send(swarm.verifier.addrs[0], protocol, frame(b""))
        assert info is not None and "error" in info  # the desk still answers
    else:
        still_serves(swarm, local_model, tiny_model_dir)
    assert swarm.target.server.ctx.active_sessions == 0


# -- load ------------------------------------------------------------------------------


def test_eight_concurrent_clients_64_tokens(tiny_model_dir, local_model):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        for span in [(0, 3), (3, 6), (0, 3), (3, 6)]:
            swarm.start_server(span)
        prompts = [
            torch.randint(3, 512, (1, 4 + i), generator=torch.Generator().manual_seed(30 + i))
            for i in range(8)
        ]
        expected = [expected_tokens(local_model, ids, 64) for ids in prompts]
        results: list[object] = [None] * 8

        def client(i: int) -> None:
            try:
                with DistributedModelForCausalLM.from_pretrained(
                    tiny_model_dir, swarm.initial_peers, request_timeout=30
                ) as model:
                    out = model.generate(prompts[i], max_new_tokens=64, eos_token_id=[])
                    results[i] = out[0].tolist()
            except Exception as exc:  # recorded: the test fails on any error
                results[i] = exc

        began = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=100)
        seconds = time.monotonic() - began
        errors = [r for r in results if not isinstance(r, list)]
        print(f"\n[faults] 8 clients x 64 tokens in {seconds:.1f} s, errors: {len(errors)}")
        assert not errors, errors
        assert results == expected
    finally:
        swarm.close()


def test_session_flood_beyond_max_sessions(tiny_model_dir, local_model):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        limit, flood = 4, 60
        server = swarm.start_server((0, 6), config=ServerConfig(max_sessions=limit))
        peer = parse_peer_addr(server.addrs[0]).peer_id

        async def open_all() -> list[dict[str, str]]:
            host = make_host(Identity.generate())
            replies: list[dict[str, str]] = []
            async with running_host(host, []):
                await host.connect(parse_peer_addr(server.addrs[0]))
                streams = []

                async def one(i: int) -> None:
                    stream = await host.new_stream(peer, [protocols.INFERENCE])
                    streams.append(stream)
                    opening = Message(
                        meta={
                            "start": "0",
                            "end": "6",
                            "session_id": f"flood-{i:08d}",
                            "max_length": "2048",
                            "batch_size": "1",
                        }
                    )
                    await write_frame(stream, encode_message(opening))
                    replies.append(decode_message(await read_frame(stream)).meta)

                with trio.fail_after(60):
                    async with trio.open_nursery() as nursery:
                        for i in range(flood):
                            nursery.start_soon(one, i)
                assert server.server.ctx.active_sessions == limit
                for stream in streams:
                    await stream.close()
            return replies

        before = rss_mb()
        replies = swarm.loop.run(open_all)
        opened = [r for r in replies if "opened" in r]
        busy = [r for r in replies if r.get("error") == "busy"]
        assert len(opened) == limit and len(busy) == flood - limit, replies[:5]
        assert all("too many inference sessions" in r["message"] for r in busy)
        assert rss_mb() - before < 150
        wait_until(lambda: server.server.ctx.active_sessions == 0, timeout=15)
        ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(5))
        with DistributedModelForCausalLM.from_pretrained(tiny_model_dir, [server.addrs[0]]) as m:
            out = m.generate(ids, max_new_tokens=8, eos_token_id=[])
        assert out[0].tolist() == expected_tokens(local_model, ids, 8)
    finally:
        swarm.close()


# -- the verifier goes away ------------------------------------------------------------


def test_clients_keep_unexpired_records_when_the_verifier_dies(tiny_model_dir, tmp_path):
    swarm = LocalSwarm(tiny_model_dir)
    verifier = None
    try:
        honest = swarm.start_server((0, 6))
        cheat = swarm.start_server(
            (0, 6), server_cls=adversarial_server_cls(Tamper("noise", amount=0.05))
        )
        quiet = VerifierConfig(checks=CheckConfig(check_every=3600.0), record_ttl=300.0)
        verifier = start_verifier(swarm, f"sqlite:///{tmp_path / 'v.db'}", quiet)
        v = verifier.verifier
        wait_until(lambda: len(v.view.servers) == 2, timeout=20)
        assert swarm.loop.run(v.checker.check, v.view.servers[cheat.peer_id]).outcome == FRAUD
        assert swarm.loop.run(v.checker.check, v.view.servers[honest.peer_id]).outcome == PASS
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir, [honest.addrs[0]], trusted_verifiers=[verifier.peer_id]
        ) as model:
            view = model.swarm.view

            def usable() -> set[str]:
                return {a.peer_id for a in view.usable()}

            wait_until(lambda: usable() == {honest.peer_id}, timeout=30)
            stop_verifier(swarm, verifier)
            verifier = None
            # The records outlive their signer until they expire: over gossip already
            # held, and in the servers' DHT for a client that looks again.
            model.run_async(model.swarm.refresh)
            assert usable() == {honest.peer_id}
            assert view.trust.banned(cheat.peer_id)
            ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(6))
            served = cheat.server.ctx.served_requests
            model.generate(ids, max_new_tokens=4)
            assert cheat.server.ctx.served_requests == served
            # ... and a record counts as absent once expired (the client's clock moves on).
            later = time.time() + quiet.record_ttl + 1
            assert not view.trust.banned(cheat.peer_id, now=later)
            assert view.trust.allowed(cheat.peer_id, now=later)
    finally:
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()
