"""Integration: servers that die, refuse, or are over their limits are routed around."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.node.config import ServerConfig
from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message
from trustswarm.testing.local_swarm import LocalSwarm, raw_exchange

pytestmark = pytest.mark.timeout(240)


class KillAfter:
    """A generate() streamer that kills the server holding blocks 0.. after n tokens."""

    def __init__(self, swarm: LocalSwarm, n: int) -> None:
        self.swarm, self.n, self.seen, self.killed = swarm, n, 0, None

    def put(self, tokens: torch.Tensor) -> None:
        if tokens.dim() == 2:  # the prompt: transformers' generate streams it first
            return
        self.seen += 1
        if self.seen == self.n:
            busy = [s for s in self.swarm.servers if s.alive and s.server.ctx.active_sessions]
            self.killed = busy[0]
            self.swarm.kill(self.killed)

    def end(self) -> None:
        pass


@pytest.fixture()
def redundant_swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    for span in [(0, 3), (3, 6), (0, 3), (3, 6)]:
        swarm.start_server(span)
    yield swarm
    swarm.close()


def test_greedy_output_unchanged_when_a_server_dies_mid_generation(redundant_swarm, tiny_model_dir):
    ids = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(7))
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model_dir, redundant_swarm.initial_peers, request_timeout=10
    ) as model:
        expected = model.generate(ids, max_new_tokens=16)
        killer = KillAfter(redundant_swarm, 5)
        got = model.generate(ids, max_new_tokens=16, streamer=killer)
        assert killer.killed is not None
        assert killer.killed.peer_id in model.swarm.view.bans
    assert got.tolist() == expected.tolist()


def test_forward_and_backward_route_around_a_dead_server(redundant_swarm, tiny_model_dir):
    ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(8))
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model_dir, redundant_swarm.initial_peers, request_timeout=10
    ) as model:
        expected = model(input_ids=ids).logits.detach()
        redundant_swarm.kill(redundant_swarm.servers[0])
        redundant_swarm.kill(redundant_swarm.servers[3])
        for _ in range(3):  # whichever servers the random forward routes pick
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_server_over_its_session_limit_answers_busy_and_client_uses_another(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        small = swarm.start_server((0, 6), config=ServerConfig(max_sessions=1))
        big = swarm.start_server((0, 6))

        opening = Message(
            meta={
                "start": "0",
                "end": "6",
                "session_id": "s" * 16,
                "max_length": "8",
                "batch_size": "1",
            }
        )
        first, second = raw_exchange(swarm, small, protocols.INFERENCE, [opening, opening])
        assert "opened" in first
        assert second["error"] == "busy"
        ids = torch.randint(3, 512, (1, 4), generator=torch.Generator().manual_seed(9))
        with DistributedModelForCausalLM.from_pretrained(tiny_model_dir, [big.addrs[0]]) as model:
            out = model.generate(ids, max_new_tokens=4)
        assert out.shape == (1, 8)
    finally:
        swarm.close()


def test_oversized_session_request_is_refused_clearly(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        server = swarm.start_server((0, 6), config=ServerConfig(max_session_tokens=16))

        opening = Message(
            meta={
                "start": "0",
                "end": "6",
                "session_id": "s" * 16,
                "max_length": "4096",
                "batch_size": "1",
            }
        )
        (meta,) = raw_exchange(swarm, server, protocols.INFERENCE, [opening])
        assert meta["error"] == "too_large" and "max_length" in meta["message"]
    finally:
        swarm.close()
