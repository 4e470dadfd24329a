"""Forward/backward streams are reused; a stream the server closed while idle is not
held against the server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.node.config import ServerConfig
from trustswarm.testing.local_swarm import LocalSwarm

pytestmark = pytest.mark.timeout(120)
IDS = torch.tensor([[5, 6, 7, 8]])


def test_streams_are_reused_and_stale_ones_replaced(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        server = swarm.start_server((0, 6), config=ServerConfig(stream_idle_timeout=0.5))
        with DistributedModelForCausalLM.from_pretrained(tiny_model_dir, swarm.initial_peers) as m:
            with torch.no_grad():
                first = m(input_ids=IDS).logits
                (pooled,) = [s for idle in m.swarm.streams.idle.values() for s, _ in idle]
                second = m(input_ids=IDS).logits
                # The same stream carried the second request.
                assert [s for idle in m.swarm.streams.idle.values() for s, _ in idle] == [pooled]
                served = server.server.ctx.served_requests
                time.sleep(1.5)  # the server closes the idle stream
                third = m(input_ids=IDS).logits
            assert server.server.ctx.served_requests == served + 1
            assert not m.swarm.view.bans  # a closed idle stream is not a server failure
            torch.testing.assert_close(first, second)
            torch.testing.assert_close(first, third)
    finally:
        swarm.close()
