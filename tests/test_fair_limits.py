"""Fair resource limits on a server (issue 12): sessions per peer, a KV-cache memory
budget, and a deadline on writing answers. Properties of the admission rule, then real
nodes on loopback attacked the way the issue measured."""

from __future__ import annotations

import time

import pytest
import torch
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.node.admission import SessionAdmission, kv_bytes_per_token
from trustswarm.node.config import ServerConfig
from trustswarm.node.handlers import send_answer
from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message, decode_message, encode_message
from trustswarm.protocol.framing import read_frame, write_frame
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.testing.local_verifier import wait_until

pytestmark = pytest.mark.timeout(120)


@settings(max_examples=200, deadline=None)
@given(
    limits=st.tuples(st.integers(1, 8), st.integers(1, 4), st.integers(1, 10_000)),
    ops=st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 4000), st.booleans()), max_size=40
    ),
)
def test_admission_never_exceeds_its_limits(limits, ops) -> None:
    admission = SessionAdmission(*limits)
    held: list[tuple[str, int]] = []
    for peer, size, release in ops:
        if release and held:
            admission.release(*held.pop(0))
        elif admission.refusal(peer, size) is None:
            admission.admit(peer, size)
            held.append((peer, size))
        assert admission.active <= admission.max_sessions
        assert all(n <= admission.max_per_peer for n in admission.by_peer.values())
        assert admission.reserved_bytes <= admission.kv_budget_bytes
        assert admission.reserved_bytes == sum(s for _, s in held)
    for item in held:
        admission.release(*item)
    assert admission.active == 0 and admission.reserved_bytes == 0


def test_kv_bytes_per_token_of_smollm2_shape() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    # keys + values, 3 heads of 64, float32, 10 blocks
    assert kv_bytes_per_token(config, 10, torch.float32) == 2 * 3 * 64 * 4 * 10
    assert kv_bytes_per_token(config, 10, torch.bfloat16) == 2 * 3 * 64 * 2 * 10


def open_sessions(swarm: LocalSwarm, addr: str, count: int, max_length: int = 64):
    """One fresh identity opens `count` sessions and holds them; returns the replies."""

    async def run() -> list[dict[str, str]]:
        host = make_host(Identity.generate())
        replies = []
        async with running_host(host, []):
            info = parse_peer_addr(addr)
            await host.connect(info)
            streams = []
            for i in range(count):
                stream = await host.new_stream(info.peer_id, [protocols.INFERENCE])
                streams.append(stream)
                opening = Message(meta={
                    "start": "0", "end": "6", "session_id": f"squat-{i:08d}",
                    "max_length": str(max_length), "batch_size": "1",
                })  # fmt: skip
                await write_frame(stream, encode_message(opening))
                with trio.fail_after(10):
                    replies.append(decode_message(await read_frame(stream)).meta)
            for stream in streams:
                await stream.close()
        return replies

    return swarm.loop.run(run)


def test_one_peer_cannot_hold_every_session(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        config = ServerConfig(max_sessions=16, max_sessions_per_peer=4)
        node = swarm.start_server((0, 6), config=config)
        replies = open_sessions(swarm, node.addrs[0], 8)
        opened = [r for r in replies if "opened" in r]
        busy = [r for r in replies if r.get("error") == "busy"]
        assert len(opened) == 4 and len(busy) == 4, replies
        assert all("per peer" in r["message"] for r in busy)
        wait_until(lambda: node.server.ctx.active_sessions == 0, timeout=15)
        with DistributedModelForCausalLM.from_pretrained(tiny_model_dir, [node.addrs[0]]) as m:
            out = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
        assert out.shape == (1, 7)
    finally:
        swarm.close()


def test_kv_cache_budget_refuses_what_would_not_fit(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        # The tiny model: 2 kv heads x 16 dims x 4 bytes x 2 x 6 blocks = 1536 bytes/token.
        budget = 1536 * 300
        node = swarm.start_server((0, 6), config=ServerConfig(kv_cache_bytes=budget))
        big = open_sessions(swarm, node.addrs[0], 1, max_length=512)
        assert big[0].get("error") == "busy" and "KV-cache" in big[0]["message"], big
        small = open_sessions(swarm, node.addrs[0], 2, max_length=128)
        assert ["opened" in r for r in small] == [True, True], small  # 2 x 128 fit in 300
    finally:
        swarm.close()


class NeverReadStream:
    """The server's view of a peer that stopped reading: every write blocks forever (a
    peer granting no stream window). py-libp2p's own muxer buffers whatever arrives, so a
    real in-process peer cannot produce this; a custom yamux peer can."""

    async def write(self, data: bytes) -> None:
        await trio.sleep_forever()


def test_an_answer_that_cannot_be_written_gives_up_at_the_deadline(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        node = swarm.start_server((0, 6), config=ServerConfig(write_timeout=0.5))

        async def write() -> float:
            began = time.monotonic()
            with pytest.raises(trio.TooSlowError):
                await send_answer(node.server.ctx, NeverReadStream(), Message(meta={"x": "1"}))
            return time.monotonic() - began

        assert 0.4 < swarm.loop.run(write) < 5
    finally:
        swarm.close()
