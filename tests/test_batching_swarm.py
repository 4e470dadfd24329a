"""Batching across clients (issue 14) on real servers on loopback: concurrent clients
generate exactly what they generate alone (tokens and every step's logits), also while a
hostile client sends extreme, all-masked, malformed and too-long steps; a server told not
to batch serves every step alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import trio

pytestmark = pytest.mark.timeout(300)


PROMPTS = [
    torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 5, 8, 4)
]
NEW_TOKENS = 16


def _generate(model, prompt: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and every step's logits."""
    out = model.generate(
        prompt,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences[0].tolist(), torch.stack(out.logits)


def _assert_same_generations(got: list, alone: list) -> None:
    for (tokens, logits), (tokens_alone, logits_alone) in zip(got, alone, strict=True):
        assert tokens == tokens_alone
        torch.testing.assert_close(logits, logits_alone, atol=1e-4, rtol=0)


def _generate_concurrently(models: list, prompts: list[torch.Tensor]) -> list:
    """Every model generates its prompt at the same time (one thread each)."""
    results: list = [None] * len(models)
    barrier = threading.Barrier(len(models))

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = _generate(models[i], prompts[i])
        except BaseException as exc:  # reported by the test below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    for result in results:
        if not isinstance(result, tuple):
            raise AssertionError(f"a client failed: {result!r}")
    return results


def _hostile(swarm, target, stop: threading.Event, replies: list[str]) -> None:
    """A bare peer that keeps sending its own extreme or malformed steps."""
    from trustswarm.protocol import protocols
    from trustswarm.protocol.codec import Message, decode_message
    from trustswarm.protocol.framing import read_frame, send_message
    from trustswarm.protocol.identity import Identity
    from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host

    start, end = target.server.runner.start, target.server.runner.end
    hidden = target.server.runner.hidden_size
    steps = [
        {"hidden_states": torch.full((2, 1, hidden), 3.0e38)},
        {"hidden_states": torch.randn(2, 1, hidden), "attention_mask": torch.zeros(2, 2).long()},
        {"hidden_states": torch.randn(2, 1, hidden), "attention_mask": torch.ones(2, 7).long()},
        {"hidden_states": torch.randn(2, 40, hidden)},  # past the session's max_length
    ]

    async def run() -> None:
        host = make_host(Identity.generate())
        async with running_host(host, []):
            info = parse_peer_addr(target.addrs[0])
            await host.connect(info)
            round_ = 0
            while not stop.is_set():
                stream = await host.new_stream(info.peer_id, [protocols.INFERENCE])
                opening = {
                    "start": str(start), "end": str(end), "session_id": f"hostile-{round_:08d}",
                    "max_length": "32", "batch_size": "2",
                }  # fmt: skip
                await send_message(stream, Message(meta=opening))
                with trio.fail_after(20):
                    session = decode_message(await read_frame(stream)).meta["opened"]
                for n in range(2):
                    tensors = (
                        {"hidden_states": torch.randn(2, 1, hidden)}
                        if n == 0
                        else steps[round_ % 4]
                    )
                    step = Message(tensors=tensors, meta={"session_id": session, "step": str(n)})
                    await send_message(stream, step)
                    with trio.fail_after(20):
                        reply = decode_message(await read_frame(stream)).meta
                    replies.append(reply.get("error", "answer"))
                await stream.close()
                round_ += 1

    swarm.loop.run(run)


@pytest.fixture(scope="module")
def batching_swarm(tiny_model_dir: Path):
    from trustswarm.testing.local_swarm import LocalSwarm

    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server((0, 3))
        swarm.start_server((3, 6))
        yield swarm
    finally:
        swarm.close()


def _clients(tiny_model_dir: Path, swarm, count: int) -> list:
    from trustswarm.client import DistributedModelForCausalLM

    return [
        DistributedModelForCausalLM.from_pretrained(tiny_model_dir, swarm.initial_peers)
        for _ in range(count)
    ]


def _batched_steps(swarm) -> int:
    return sum(s.server.ctx.batcher.steps_batched for s in swarm.servers)


def test_concurrent_clients_generate_what_they_generate_alone(tiny_model_dir, batching_swarm):
    models = _clients(tiny_model_dir, batching_swarm, len(PROMPTS))
    try:
        alone = [_generate(m, p) for m, p in zip(models, PROMPTS, strict=True)]
        before = _batched_steps(batching_swarm)
        together = _generate_concurrently(models, PROMPTS)
    finally:
        for m in models:
            m.close()
    _assert_same_generations(together, alone)
    assert _batched_steps(batching_swarm) > before  # their steps did share passes


def test_a_hostile_client_does_not_disturb_its_batch_mates(tiny_model_dir, batching_swarm):
    models = _clients(tiny_model_dir, batching_swarm, 3)
    stop, replies = threading.Event(), []
    target = batching_swarm.servers[0]
    try:
        alone = [_generate(m, p) for m, p in zip(models, PROMPTS[:3], strict=True)]
        hostile = threading.Thread(target=_hostile, args=(batching_swarm, target, stop, replies))
        hostile.start()
        deadline = time.monotonic() + 30
        while len(replies) < 2 and time.monotonic() < deadline:  # it is at work
            time.sleep(0.05)
        try:
            together = _generate_concurrently(models, PROMPTS[:3])
        finally:
            stop.set()
            hostile.join(60)
    finally:
        for m in models:
            m.close()
    _assert_same_generations(together, alone)
    assert "answer" in replies and any(r != "answer" for r in replies)  # it was served
    for m in models:  # nobody was banned or blamed
        assert not m.swarm.view.bans


def test_a_server_told_not_to_batch_runs_steps_alone(tiny_model_dir: Path) -> None:
    from trustswarm.client import DistributedModelForCausalLM
    from trustswarm.node.config import ServerConfig
    from trustswarm.testing.local_swarm import LocalSwarm

    swarm = LocalSwarm(tiny_model_dir)
    try:
        server = swarm.start_server((0, 6), config=ServerConfig(batch_steps=False))
        assert server.server.ctx.batcher is None
        with DistributedModelForCausalLM.from_pretrained(tiny_model_dir, swarm.initial_peers) as m:
            tokens = m.generate(PROMPTS[0], max_new_tokens=4, do_sample=False)
        assert tokens.shape == (1, PROMPTS[0].shape[1] + 4)
    finally:
        swarm.close()
