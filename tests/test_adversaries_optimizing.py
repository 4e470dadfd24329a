"""Our own optimizing adversaries (issue 10), on the tiny model: the framing search finds
inputs whose span output cancels, steering reaches its target inside what `accept`
allows and never returns anything it rejects, and the steering server and the framing
client run against real servers and a real verifier on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier  # noqa: F401
from trustswarm.client.reports import VERDICTS
from trustswarm.client.rpc import checked_statement, close_quietly, open_stream
from trustswarm.client.session import open_session
from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ModelDir
from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message
from trustswarm.protocol.comparator import FORWARD_TOLERANCES, Tolerance
from trustswarm.protocol.evidence import Evidence, SignedExchange
from trustswarm.protocol.framing import receive_message, send_message
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host, running_host
from trustswarm.testing.framing import (
    FramingError,
    find_framing_input,
    framing_inputs,
    honest_error,
)
from trustswarm.testing.framing_client import (
    FramingClient,
    FramingTarget,
    ask_forward,
    ask_session,
    span_call,
)
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.testing.steering import (
    announced_tolerance,
    comparator_accept,
    model_downstream,
    runner_up,
    steer_last_token,
)
from trustswarm.testing.steering_server import Steering, SteeringServer
from trustswarm.verifier.config import CheckConfig, VerifierConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]
IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])


@pytest.fixture(scope="module")
def md(tiny_model_dir: Path) -> ModelDir:
    return ModelDir.open(tiny_model_dir)


@pytest.fixture(scope="module")
def full(md: ModelDir) -> BlockRunner:
    return BlockRunner(md, 0, md.num_blocks, torch.float32)


def inputs_at(md: ModelDir, full: BlockRunner, start: int) -> torch.Tensor:
    """A real prompt's hidden states entering block `start`."""
    with torch.inference_mode():
        h = md.load_client_parts().embed_tokens(IDS).float()
        return full.forward(h, None, None, 0, start) if start else h


# -- framing ----------------------------------------------------------------------------


def test_framing_search_cancels_the_span_output(md, full):
    start, end = 2, 4
    x0 = inputs_at(md, full, start)[:, -1:]
    r64 = BlockRunner(md, start, end, torch.float64)
    found = find_framing_input(r64, start, end, x0, iterations=60)
    assert found.ratio < 1e-3 * found.initial_ratio  # orders of magnitude
    out = r64.forward(found.hidden, found.positions, None, start, end)
    assert float(out.norm() / found.hidden.norm()) == pytest.approx(found.ratio, rel=1e-6)
    # There, honest bfloat16 and float32 disagree far beyond any tolerance.
    f32, bf16 = BlockRunner(md, start, end), BlockRunner(md, start, end, torch.bfloat16)
    error, _ = honest_error(f32, bf16, found.hidden, found.positions, start, end)
    assert error > 0.5
    # A float32 runner works too (a float64 copy is built for the residuals).
    again = find_framing_input(f32, start, end, x0, iterations=5)
    assert again.ratio < again.initial_ratio
    with pytest.raises(FramingError):
        find_framing_input(f32, start, end, x0[0])


def test_framing_inputs_cover_every_objective(md, full):
    start, end = 1, 5
    runners = tuple(
        BlockRunner(md, start, end, d) for d in (torch.float64, torch.float32, torch.bfloat16)
    )
    x0 = inputs_at(md, full, start)[:, -1:]
    found = framing_inputs(runners, start, end, x0, lm_iterations=40, search_iterations=40)
    assert {f.objective for f in found} == {"cancel", "bf16_error", "extreme"}
    errors = [f.error for f in found]
    assert errors == sorted(errors, reverse=True)
    by = {f.objective: f for f in found if f.objective != "extreme"}
    assert by["bf16_error"].error >= by["cancel"].error > 0.1
    assert all(f.hidden.dtype == torch.float32 and f.hidden.shape == x0.shape for f in found)


# -- steering ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def span_answers(md, full):
    """Span 2:4 of the prompt: (float32 reference, bfloat16 answer, downstream)."""
    x = inputs_at(md, full, 2)
    with torch.inference_mode():
        reference = full.forward(x, None, None, 2, 4)
        answer = BlockRunner(md, 2, 4, torch.bfloat16).forward(x)
    downstream = model_downstream(md.load_client_parts(), full, None, None, 4, md.num_blocks)
    return reference, answer, downstream


def test_downstream_last_row_path_matches_the_full_model(span_answers):
    reference, _, downstream = span_answers
    full_path = downstream(reference.clone().requires_grad_(True)).detach()
    for shift in (0.0, 0.5, -0.25):  # only the last row changes: the cached path
        h = reference.clone()
        h[0, -1] += shift
        fast = downstream(h)
        slow = downstream(h.clone().requires_grad_(True)).detach()
        assert torch.allclose(fast, slow, atol=1e-4, rtol=1e-4)
    assert torch.allclose(downstream(reference), full_path, atol=1e-4, rtol=1e-4)


def test_steering_reaches_its_target_within_a_loose_acceptance(span_answers):
    reference, answer, downstream = span_answers
    target = runner_up(downstream(reference))
    loose = Tolerance(token_rel_error=0.5, max_abs_ratio=50.0)
    calls: list[torch.Tensor] = []
    accept = comparator_accept([reference], loose)

    def recording(candidate: torch.Tensor) -> bool:
        calls.append(candidate)
        return accept(candidate)

    result = steer_last_token(answer, target, downstream, recording, 20, tolerance=loose)
    assert result.success and result.margin > 0 > result.initial_margin
    assert int(downstream(result.output).argmax()) == target
    assert result.output.dtype == torch.bfloat16 and accept(result.output)
    assert torch.equal(result.output[:, :-1], answer[:, :-1])  # only the last row moved
    assert calls  # every candidate went through accept


def test_steering_never_returns_what_accept_refuses(span_answers):
    reference, answer, downstream = span_answers
    worst = int(downstream(reference).argmin())
    # A float32 attacker against the float32 tolerance: nowhere near the least likely token.
    tight = comparator_accept([reference], FORWARD_TOLERANCES["float32"])
    result = steer_last_token(
        reference, worst, downstream, tight, 6, tolerance=announced_tolerance(torch.float32)
    )
    assert result.accepted and tight(result.output) and not result.reached
    assert result.output.dtype == torch.float32
    # Nothing but the honest answer accepted: the honest answer comes back.
    only_honest = steer_last_token(answer, worst, downstream, lambda c: torch.equal(c, answer), 4)
    assert torch.equal(only_honest.output, answer) and only_honest.accepted
    # An honest answer that accept refuses: returned as is, marked not accepted.
    refused = steer_last_token(answer, worst, downstream, lambda c: False, 4)
    assert not refused.accepted and refused.steps == 0


# -- on loopback: the steering server, the framing client -------------------------------


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    swarm.honest = swarm.start_server((0, 6), dtype=torch.bfloat16)
    swarm.steerer = swarm.start_server(
        (2, 4), dtype=torch.bfloat16, server_cls=SteeringServer, steering=Steering(steps=8)
    )
    yield swarm
    swarm.close()


def ask(swarm, running, x: torch.Tensor) -> list[Evidence]:
    """A forward request and a one-step session, through the client library."""
    positions = torch.arange(x.shape[1])[None]

    async def run() -> list[Evidence]:
        host = make_host(Identity.generate())
        async with running_host(host, []):
            call = await span_call(host, FramingTarget(running.peer_id, tuple(running.addrs)))
            forward = await ask_forward(host, call, x, positions, 30.0)
            session = await ask_session(host, call, x, positions, 30.0)
        return [Evidence((forward,)), Evidence((session,))]

    return swarm.loop.run(run)


def test_steering_server_signs_valid_steered_answers(swarm, md, full):
    x = inputs_at(md, full, 2)
    evidence = ask(swarm, swarm.steerer, x)  # the client's checks passed: signed, in bf16
    server = swarm.steerer.server
    assert len(server.results) == 2
    reference = full.forward(x, None, None, 2, 4)
    for item, result in zip(evidence, server.results, strict=True):
        (opened,) = item.open()  # signature and digests hold
        assert opened.statement.dtype == "bfloat16"
        assert torch.equal(opened.output, result.output)
        assert result.accepted
        assert comparator_accept([reference], announced_tolerance(torch.bfloat16))(opened.output)


def session_of(swarm, running, x: torch.Tensor, extra: torch.Tensor) -> Evidence:
    """A two-step session: prefill x, then one decode step `extra` ([1, 1, H])."""
    tokens = x.shape[1]

    async def run() -> Evidence:
        host = make_host(Identity.generate())
        async with running_host(host, []):
            call = await span_call(host, FramingTarget(running.peer_id, tuple(running.addrs)))
            stream = await open_stream(host, call.peer_id, protocols.INFERENCE, 30.0)
            chain = await open_session(stream, call, tokens + 1, 1, 30.0)
            exchanges = []
            for hidden, first in ((x, 0), (extra, tokens)):
                n = hidden.shape[1]
                request = Message(
                    tensors={
                        "hidden_states": hidden.float().contiguous(),
                        "position_ids": torch.arange(first, first + n)[None],
                        "attention_mask": torch.ones(1, first + n, dtype=torch.long),
                    },
                    meta={"session_id": chain.session_id, "step": str(chain.step)},
                )
                raw = await send_message(stream, request)
                answer, raw_answer = await receive_message(stream)
                _, statement = checked_statement(
                    call, "inference", raw, answer, "hidden_states", chain
                )
                chain.advance(statement)
                exchanges.append(SignedExchange(raw, raw_answer))
            await close_quietly(stream)
        return Evidence(tuple(exchanges))

    return swarm.loop.run(run)


def test_steering_server_steers_every_session_step(swarm, md, full):
    x = inputs_at(md, full, 2)
    server = swarm.steerer.server
    before = len(server.results)
    evidence = session_of(swarm, swarm.steerer, x[:, :-1], x[:, -1:])
    opened = evidence.open()  # one session, chained step by step, validly signed
    results = server.results[before:]
    assert len(opened) == len(results) == 2
    reference = full.forward(x, None, None, 2, 4)
    accept = comparator_accept([reference[:, -1:]], announced_tolerance(torch.bfloat16))
    assert accept(opened[1].output)  # the decode step, against the whole prompt's reference
    for item, result in zip(opened, results, strict=True):
        assert torch.equal(item.output, result.output) and result.accepted


def test_framing_client_reports_to_a_verifier(swarm, md, full, tmp_path):
    config = VerifierConfig(checks=CheckConfig(check_every=3600.0))
    verifier = start_verifier(swarm, f"sqlite:///{tmp_path / 'v.db'}", config)
    try:
        runners = tuple(
            BlockRunner(md, 0, 6, d) for d in (torch.float64, torch.float32, torch.bfloat16)
        )
        x0 = md.load_client_parts().embed_tokens(IDS[:, :1]).float()
        inputs = framing_inputs(runners, 0, 6, x0, lm_iterations=30, search_iterations=20)[:2]
        client = FramingClient(verifier.addrs[0], timeout=30.0, reports_per_identity=3)
        target = FramingTarget(swarm.honest.peer_id, tuple(swarm.honest.addrs))
        outcomes = swarm.loop.run(lambda: client.frame(target, inputs))
    finally:
        stop_verifier(swarm, verifier)
    assert [(o.label, o.kind) for o in outcomes] == [
        (i.label, k) for i in inputs for k in ("forward", "inference")
    ]
    for outcome in outcomes:
        assert outcome.verdict is not None, outcome.error
        assert outcome.verdict.verdict in VERDICTS
    assert len(client.reports) == 4
    assert all(r.minority == (swarm.honest.peer_id,) for r in client.reports)
