"""Server-to-server chaining of inference steps (protocol/chained.py, node/forwarding.py,
client/chained_session.py): real servers on loopback, the tiny model."""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import trio

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.client.chained_session import ChainedInferenceSession
from trustswarm.client.model import default_positions
from trustswarm.client.rpc import SpanCall
from trustswarm.client.session import InferenceSession, open_session
from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ModelDir
from trustswarm.node.forwarding import ChainedSteps
from trustswarm.node.server import BlockServer
from trustswarm.protocol import protocols
from trustswarm.protocol.chained import (
    MAGIC,
    MAX_HEADER_BYTES,
    ChainFrame,
    Downstream,
    Upstream,
    encode_chain_frame,
    splice_hidden,
)
from trustswarm.protocol.codec import Message, decode_message, encode_message
from trustswarm.protocol.digests import bytes_digest, tensors_digest
from trustswarm.protocol.evidence import Evidence
from trustswarm.protocol.framing import (
    raise_if_error,
    read_frame,
    receive_message,
    write_frame,
)
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.sessions import new_client_part, new_server_nonce, session_id_of
from trustswarm.protocol.statement import SignedStatement, sign_statement
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host
from trustswarm.testing.adversary import Tamper, adversarial_server_cls
from trustswarm.testing.local_swarm import LocalSwarm, RunningServer
from trustswarm.testing.local_verifier import wait_until
from trustswarm.verifier.judge import Judge

pytestmark = pytest.mark.timeout(300)

SPANS = [(0, 2), (2, 4), (4, 6)]


def prompt(seed: int, tokens: int = 6) -> torch.Tensor:
    return torch.randint(3, 512, (1, tokens), generator=torch.Generator().manual_seed(seed))


def client(model_dir: Path, swarm: LocalSwarm, **kwargs: object) -> DistributedModelForCausalLM:
    model = DistributedModelForCausalLM.from_pretrained(
        model_dir, swarm.initial_peers, request_timeout=10, **kwargs
    )
    alive = sum(s.alive for s in swarm.servers)
    wait_until(lambda: len(model.swarm.view.servers) >= alive, timeout=30)
    return model


@dataclass
class Run:
    tokens: list[int]
    session: ChainedInferenceSession
    # (peer, start, end, transcript) of every hop the session ended on
    hops: list[tuple[str, int, int, Evidence]]


def greedy(model: DistributedModelForCausalLM, ids: torch.Tensor, new: int, each=None) -> Run:
    """Greedy decoding through one inference session, step by step; `each(i)` runs
    after token i (to kill a server mid-generation)."""
    embed = model.get_input_embeddings()
    tokens = ids[0].tolist()
    with model.inference_session(max_length=len(tokens) + new) as sync:
        session = sync.session
        step = ids
        for i in range(new):
            mask = torch.ones(1, len(tokens), dtype=torch.long)
            positions = default_positions(mask)[:, -step.shape[1] :]
            with torch.no_grad():
                hidden = sync.step(embed(step), positions, mask)
                token = int(model.logits_of(hidden[:, -1:]).argmax(-1))
            tokens.append(token)
            step = torch.tensor([[token]])
            if each is not None:
                each(i)
        hops = [
            (h.peer, h.call.start, h.call.end, Evidence(tuple(h.transcript))) for h in session.hops
        ]
    return Run(tokens, session, hops)


@pytest.fixture()
def chain_swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    for span in SPANS:
        swarm.start_server(span)
    yield swarm
    swarm.close()


def forwarded(swarm: LocalSwarm) -> int:
    return sum(s.server.ctx.chained.forwarded for s in swarm.servers if s.alive)


# -- the chained path ----------------------------------------------------------------


def test_chained_greedy_equals_unchained_and_its_evidence_is_judged_honest(
    chain_swarm, tiny_model_dir
):
    ids = prompt(1)
    with client(tiny_model_dir, chain_swarm, chaining=False) as plain:
        expected = plain.generate(ids, max_new_tokens=10)[0].tolist()
    with client(tiny_model_dir, chain_swarm) as model:
        assert model.generate(ids, max_new_tokens=10)[0].tolist() == expected
        before = forwarded(chain_swarm)
        run = greedy(model, ids, 10)
    assert run.tokens == expected
    assert isinstance(run.session, ChainedInferenceSession)
    assert run.session.chained_steps == 10 and not run.session.chain_failures
    assert forwarded(chain_swarm) - before == 10 * (len(SPANS) - 1)  # hop to hop, no client
    model_dir = ModelDir.open(tiny_model_dir)
    judge = Judge(BlockRunner(model_dir, 0, model_dir.num_blocks), model_dir.manifest.model_id)
    assert [(start, end) for _, start, end, _ in run.hops] == SPANS
    for peer, _, _, evidence in run.hops:
        opened = evidence.open()  # signatures, digests, one session, every link
        assert [o.statement.step for o in opened] == list(range(10))
        assert {o.statement.server_peer_id for o in opened} == {peer}
        verdict = judge.judge(evidence)  # the verifier's audit of a hop transcript
        assert not verdict.wrong and verdict.steps == 10, verdict.reason


def test_a_tampering_hop_in_a_chain_is_proven_wrong_from_its_transcript(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server(SPANS[0])
        cheat = swarm.start_server(SPANS[1], server_cls=adversarial_server_cls(Tamper("noise")))
        swarm.start_server(SPANS[2])
        with client(tiny_model_dir, swarm) as model:
            run = greedy(model, prompt(2), 6)
        assert run.session.chained_steps == 6 and cheat.server.tampered > 0
        model_dir = ModelDir.open(tiny_model_dir)
        judge = Judge(BlockRunner(model_dir, 0, model_dir.num_blocks), model_dir.manifest.model_id)
        verdicts = {peer: judge.judge(evidence) for peer, _, _, evidence in run.hops}
        assert verdicts[cheat.peer_id].wrong and verdicts[cheat.peer_id].proven
        assert [p for p, v in verdicts.items() if v.wrong] == [cheat.peer_id]
    finally:
        swarm.close()


def test_redundant_and_unchained_sessions_stay_client_driven(chain_swarm, tiny_model_dir):
    for _ in range(2):
        chain_swarm.start_server((0, 6))
    with client(tiny_model_dir, chain_swarm) as model:
        with model.inference_session(max_length=8, redundancy=2) as sync:
            assert not isinstance(sync.session, ChainedInferenceSession)
    with client(tiny_model_dir, chain_swarm, chaining=False) as model:
        with model.inference_session(max_length=8) as sync:
            assert type(sync.session) is InferenceSession
    with pytest.raises(ValueError, match="chaining"):
        DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir, chain_swarm.initial_peers, chaining="yes"
        )


# -- failures fall back ----------------------------------------------------------------


def test_a_hop_killed_mid_generation_falls_back_and_generation_finishes(tiny_model_dir):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        for span in SPANS + [SPANS[1]]:
            swarm.start_server(span)
        ids = prompt(3)
        with client(tiny_model_dir, swarm, chaining=False) as plain:
            expected = plain.generate(ids, max_new_tokens=12)[0].tolist()
        killed: list[RunningServer] = []

        def kill_middle(i: int) -> None:
            if i == 4:
                busy = [
                    s
                    for s in swarm.servers
                    if s.server.runner.start == 2 and s.server.ctx.active_sessions
                ]
                killed.append(busy[0])
                swarm.kill(busy[0])

        with client(tiny_model_dir, swarm) as model:
            run = greedy(model, ids, 12, each=kill_middle)
            assert killed and killed[0].peer_id in model.swarm.view.bans
            bans = set(model.swarm.view.bans)
        assert run.tokens == expected
        failures = run.session.chain_failures
        assert [f.peer for f in failures] == [killed[0].peer_id]
        assert run.session.chained_steps >= 10  # chaining resumed after the fallback
        assert bans == {killed[0].peer_id}  # the hops around it were not blamed
    finally:
        swarm.close()


@dataclass
class HostileSteps(ChainedSteps):
    """A middle hop that answers the client honestly but forwards `mode`."""

    mode: str = "silent"

    async def _forward(self, ctx, session, nxt, answer, client) -> None:  # type: ignore[override]
        if self.mode == "silent":
            return
        if self.mode == "garbage":
            stream, _ = await self.links.take(nxt.peer)
            await write_frame(stream, b"\x07" * 64)
            await self.links.drop(stream)
            return
        signed = SignedStatement.from_meta(answer.meta)
        output = answer.tensor("hidden_states") * 1.5
        if self.mode == "equivocate":  # signs a second output for the same step
            statement = dataclasses.replace(
                signed.statement, output_digest=tensors_digest({"hidden_states": output})
            )
            meta = sign_statement(ctx.identity, statement).to_meta()
        else:  # "unsigned": another output under the statement it gave the client
            meta = signed.to_meta()
        await super()._forward(ctx, session, nxt, Message({"hidden_states": output}, meta), client)


def hostile_server_cls(mode: str) -> type[BlockServer]:
    class HostileForwarder(BlockServer):
        def _chained_steps(self) -> ChainedSteps:
            return HostileSteps(self.host, mode=mode)

    return HostileForwarder


@pytest.mark.parametrize("mode", ["silent", "garbage", "unsigned", "equivocate"])
def test_a_hostile_middle_hop_falls_back_and_the_next_hop_is_not_banned(tiny_model_dir, mode):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server(SPANS[0])
        hostile = swarm.start_server(SPANS[1], server_cls=hostile_server_cls(mode))
        honest_next = swarm.start_server(SPANS[2])
        ids = prompt(4)
        with client(tiny_model_dir, swarm, chaining=False) as plain:
            expected = plain.generate(ids, max_new_tokens=6)[0].tolist()
        with client(tiny_model_dir, swarm) as model:
            run = greedy(model, ids, 6)
            bans = dict(model.swarm.view.bans)
        assert run.tokens == expected
        failures = run.session.chain_failures
        assert failures and all(f.hop == 2 and f.peer == honest_next.peer_id for f in failures)
        assert len(failures) == run.session.max_chain_failures  # then it stopped chaining
        assert not bans, bans  # neither the honest next hop nor the unprovable forwarder
        assert honest_next.alive and hostile.alive
    finally:
        swarm.close()


# -- what a server refuses ---------------------------------------------------------


async def _raw_session(host, target: RunningServer, start: int, end: int):
    """A bare client's inference session on `target`: (stream, chain)."""
    info = parse_peer_addr(target.addrs[0])
    await host.connect(info)
    stream = await host.new_stream(info.peer_id, [protocols.INFERENCE])
    digest = target.server.model_dir.manifest.span_digest(start, end)
    call = SpanCall(info.peer_id, target.server.model_id, start, end, digest, "float32")
    return stream, await open_session(stream, call, 16, 1, 10)


def _step_bytes(chain, hidden: torch.Tensor) -> bytes:
    tokens = hidden.shape[1]
    return encode_message(
        Message(
            {
                "hidden_states": hidden,
                "position_ids": torch.arange(chain.step, chain.step + tokens)[None],
                "attention_mask": torch.ones(1, chain.step + tokens, dtype=torch.long),
            },
            {"session_id": chain.session_id, "step": str(chain.step)},
        )
    )


def test_a_next_hop_that_does_not_serve_the_next_blocks_is_refused_without_redialling(
    chain_swarm, tiny_model_dir
):
    first, _, last = chain_swarm.servers
    steps: ChainedSteps = first.server.ctx.chained
    hidden = torch.randn(1, 1, first.server.runner.hidden_size)

    async def run() -> list[str]:
        answers = []
        async with running_host(make_host(Identity.generate()), []) as host:
            stream, chain = await _raw_session(host, first, 0, 2)
            for nxt in [last, last, chain_swarm.servers[1], first]:  # 4:6, again, new, self
                down = Downstream(nxt.peer_id, tuple(nxt.addrs), chain.session_id, 0)
                frame = ChainFrame(5.0, None, down, _step_bytes(chain, hidden))
                await write_frame(stream, encode_chain_frame(frame))
                with trio.fail_after(10):
                    answer, _ = await receive_message(stream)
                raise_if_error(answer)  # the step itself is answered
                chain.advance(SignedStatement.from_meta(answer.meta).statement)
                answers.append(answer.meta["statement"])
                await trio.sleep(0.2)  # the forward attempt runs after the answer
        return answers

    assert len(chain_swarm.loop.run(run)) == 4
    assert steps.forwarded == 0
    # One dial and check (of blocks 4:6), none for the repeat, none for another peer
    # named by the client whose named peer failed, none for itself.
    assert steps.checks == 1
    assert [key[:2] for key in steps.failed_until] == [(last.peer_id, 2)]

    async def poison() -> None:  # blocks 2:3 on the middle server, "next" 4:6: refused
        middle = chain_swarm.servers[1]
        async with running_host(make_host(Identity.generate()), []) as host:
            stream, chain = await _raw_session(host, middle, 2, 3)
            down = Downstream(last.peer_id, tuple(last.addrs), chain.session_id, 0)
            frame = ChainFrame(5.0, None, down, _step_bytes(chain, hidden))
            await write_frame(stream, encode_chain_frame(frame))
            with trio.fail_after(10):
                raise_if_error((await receive_message(stream))[0])
            await trio.sleep(0.5)

    chain_swarm.loop.run(poison)
    assert chain_swarm.servers[1].server.ctx.chained.failed_until
    # It keeps serving, and the peer a client named for the wrong blocks is not refused
    # to others for the right ones.
    with client(tiny_model_dir, chain_swarm) as model:
        run_ = greedy(model, prompt(5), 3)
    assert run_.session.chained_steps == 3 and not run_.session.chain_failures


def test_a_malformed_chain_frame_gets_a_clear_error_and_the_server_keeps_serving(
    chain_swarm, tiny_model_dir
):
    target = chain_swarm.servers[1]
    bad_frames = [
        MAGIC + struct.pack(">I", 10) + b"{not json}",
        MAGIC + struct.pack(">I", MAX_HEADER_BYTES + 1),
        MAGIC + struct.pack(">I", 45) + b'{"wait": NaN, "upstream": null, "next": null}',
    ]

    async def one(frame: bytes) -> dict[str, str]:
        async with running_host(make_host(Identity.generate()), []) as host:
            stream, _ = await _raw_session(host, target, 2, 4)
            await write_frame(stream, frame)
            with trio.fail_after(10):
                return decode_message(await read_frame(stream)).meta

    for frame in bad_frames:
        meta = chain_swarm.loop.run(one, frame)
        assert meta["error"] in {"bad_request", "too_large"}, meta
        assert "chain frame" in meta["message"]
    with client(tiny_model_dir, chain_swarm) as model:
        run = greedy(model, prompt(6), 3)
    assert run.session.chained_steps == 3


def test_a_forwarded_input_not_from_the_named_upstream_is_refused(chain_swarm):
    """A stranger who knows the session id: before the chain frame its input is only
    kept (one per sender), once the frame names the upstream it is refused, and the
    waiting step answers "input missing" with its session untouched."""
    upstream, target, _ = chain_swarm.servers
    hidden_size = target.server.runner.hidden_size

    async def run() -> tuple[list[dict[str, str]], dict[str, str]]:
        async with running_host(make_host(Identity.generate()), []) as host:
            stream, chain = await _raw_session(host, target, 2, 4)
            info = parse_peer_addr(target.addrs[0])
            forged = Message(
                {"hidden_states": torch.zeros(1, 1, hidden_size)},
                {"statement": "{}", "signature": "00", "to_session": chain.session_id},
            )
            acks = []
            link = await host.new_stream(info.peer_id, [protocols.CHAIN])
            await write_frame(link, encode_message(forged))
            with trio.fail_after(10):
                acks.append(decode_message(await read_frame(link)).meta)
            up = Upstream(upstream.peer_id, session_id_of(new_client_part(), new_server_nonce()), 0)
            template = _step_bytes(chain, torch.zeros(1, 1, hidden_size))
            await write_frame(stream, encode_chain_frame(ChainFrame(2.0, up, None, template)))
            await trio.sleep(0.3)  # the frame now waits for its input
            link = await host.new_stream(info.peer_id, [protocols.CHAIN])
            await write_frame(link, encode_message(forged))
            with trio.fail_after(10):
                acks.append(decode_message(await read_frame(link)).meta)
                answer = decode_message(await read_frame(stream)).meta
        return acks, answer

    (early, refused), answer = chain_swarm.loop.run(run)
    assert early == {"accepted": "early"}
    assert refused["error"] == "bad_request" and "did not name" in refused["message"]
    assert answer["error"] == "busy" and "did not arrive" in answer["message"]
    assert target.server.ctx.chained.forwarded == 0


def test_an_input_that_comes_before_its_chain_frame_is_kept_and_used(chain_swarm):
    """A bare client chains two hops but sends the second hop its frame only after the
    first hop has forwarded: the second hop takes the kept input, and its signed request
    is the template with the first hop's output spliced in."""
    first, second, _ = chain_swarm.servers
    hidden = torch.randn(1, 2, first.server.runner.hidden_size)

    async def run() -> tuple[Message, Message, bytes]:
        async with running_host(make_host(Identity.generate()), []) as host:
            s1, c1 = await _raw_session(host, first, 0, 2)
            s2, c2 = await _raw_session(host, second, 2, 4)
            down = Downstream(second.peer_id, tuple(second.addrs), c2.session_id, 0)
            await write_frame(
                s1, encode_chain_frame(ChainFrame(5.0, None, down, _step_bytes(c1, hidden)))
            )
            with trio.fail_after(10):
                a1, _ = await receive_message(s1)
            raise_if_error(a1)
            with trio.fail_after(10):  # the forward is done (and kept as early)
                while first.server.ctx.chained.forwarded < 1:
                    await trio.sleep(0.05)
            template = _step_bytes(c2, torch.zeros_like(hidden))
            up = Upstream(first.peer_id, c1.session_id, 0)
            await write_frame(s2, encode_chain_frame(ChainFrame(5.0, up, None, template)))
            with trio.fail_after(10):
                a2, _ = await receive_message(s2)
            return a1, raise_if_error(a2), template

    a1, a2, template = chain_swarm.loop.run(run)
    expected_request = splice_hidden(template, a1.tensor("hidden_states"))
    statement = SignedStatement.from_meta(a2.meta)
    statement.verify()
    assert statement.statement.request_digest == bytes_digest(expected_request)
    assert statement.statement.server_peer_id == second.peer_id
