"""The announced dtype is the contract (issue 10): statements sign their output's dtype,
clients and verifier probes refuse answers in any other dtype than the server announced,
and `dtype_policy="float32"` keeps bfloat16 servers out of routes and replicas."""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier, wait_until  # noqa: F401 - fixture
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.client.redundant import choose_replicas
from trustswarm.client.replicas import vote_dtypes
from trustswarm.client.rpc import SpanCall, checked_answer
from trustswarm.client.swarm import SwarmView
from trustswarm.protocol.announcement import Announcement, SignedAnnouncement
from trustswarm.protocol.codec import Message, encode_message
from trustswarm.protocol.digests import bytes_digest, tensors_digest
from trustswarm.protocol.errors import ProtocolError, SignatureError, SwarmError
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.statement import DTYPES, Statement, sign_statement
from trustswarm.testing.adversary import dtype_liar_server_cls
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.verifier.daemon import VerifierConfig
from trustswarm.verifier.spotcheck import FAIL, FRAUD, PASS, CheckConfig

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]

A = Identity.generate()
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- checked_answer: wire dtype, signed dtype, announced dtype ----------------------------


def answer_in(wire: str, signed: str) -> tuple[bytes, Message]:
    request = encode_message(Message({"hidden_states": torch.ones(1, 2, 4)}, {"start": "0"}))
    output = {"hidden_states": torch.full((1, 2, 4), 1.5, dtype=TORCH[wire])}
    statement = Statement(
        kind="forward",
        server_peer_id=str(A.peer_id),
        model_id="m",
        start=0,
        end=2,
        weights_digest="a" * 64,
        request_digest=bytes_digest(request),
        output_digest=tensors_digest(output),
        session_id="",
        step=0,
        chain="",
        dtype=signed,
        timestamp=time.time(),
    )
    return request, Message(output, sign_statement(A, statement).to_meta())


@pytest.mark.parametrize(
    ("wire", "signed", "announced"), list(itertools.product(sorted(DTYPES), repeat=3))
)
def test_checked_answer_wants_the_announced_dtype(wire: str, signed: str, announced: str):
    request, answer = answer_in(wire, signed)
    call = SpanCall(A.peer_id, "m", 0, 2, "a" * 64, announced)
    if wire == signed == announced:
        assert (
            checked_answer(call, "forward", request, answer, "hidden_states").dtype == TORCH[wire]
        )
    elif wire != announced:
        with pytest.raises(ProtocolError, match=f"announced {announced} but answered in {wire}"):
            checked_answer(call, "forward", request, answer, "hidden_states")
    else:  # the tensor is what was announced, the signed statement says otherwise
        with pytest.raises(SignatureError, match="dtype"):
            checked_answer(call, "forward", request, answer, "hidden_states")


# -- the dtype policy in the swarm view -----------------------------------------------------


def ann(peer: str, start: int, end: int, dtype: str, throughput: float = 10.0) -> Announcement:
    return Announcement(peer, "m", start, end, "0" * 64, dtype, throughput, (), 0.0, 1e12)


def view_of(*servers: Announcement, policy: str = "any") -> SwarmView:
    view = SwarmView("m", lambda a, b: "0" * 64, dtype_policy=policy)
    view.servers = {s.peer_id: s for s in servers}
    return view


def test_float32_policy_routes_only_through_float32_servers():
    fast_bf16 = ann("bf16", 0, 6, "bfloat16", throughput=1000.0)
    servers = (ann("a", 0, 3, "float32"), ann("b", 3, 6, "float32"), fast_bf16)
    assert [h.server.peer_id for h in view_of(*servers).inference_route(0, 6)] == ["bf16"]
    strict = view_of(*servers, policy="float32")
    assert [h.server.peer_id for h in strict.inference_route(0, 6)] == ["a", "b"]
    for seed in range(20):
        route = strict.forward_route(0, 6, random.Random(seed))
        assert {h.server.peer_id for h in route} == {"a", "b"}
    assert strict.segments(0, 6, 1) == [(0, 3), (3, 6)]
    assert {s.peer_id for s in strict.usable()} == {"a", "b"}


def test_float32_policy_says_why_no_route_exists():
    servers = (ann("a", 0, 3, "float32"), ann("c", 3, 6, "bfloat16"), ann("d", 4, 6, "float16"))
    strict = view_of(*servers, policy="float32")
    message = r"block.*3.*\(dtype_policy='float32' leaves out 2 server\(s\) for these blocks"
    for attempt in (
        lambda: strict.inference_route(0, 6),
        lambda: strict.forward_route(0, 6),
        lambda: strict.segments(0, 6, 1),
    ):
        with pytest.raises(SwarmError, match=message) as info:
            attempt()
        assert "bfloat16, float16" in str(info.value)
    with pytest.raises(SwarmError, match="redundancy=2") as info:
        strict.segments(0, 3, 2)  # not for lack of float32 coverage: no policy note
    assert "dtype_policy" not in str(info.value)
    assert view_of(*servers).inference_route(0, 6)  # "any" uses them


def test_bad_dtype_policy_and_unknown_announced_dtypes():
    with pytest.raises(ValueError, match="dtype_policy"):
        view_of(policy="bfloat16")
    with pytest.raises(ValueError, match="dtype_policy"):
        DistributedModelForCausalLM.from_pretrained(
            "/nonexistent", ["/ip4/127.0.0.1/tcp/1/p2p/x"], dtype_policy="fp32"
        )
    identity = Identity.generate()
    view = view_of()
    for dtype, accepted in (("float64", False), ("int8", False), ("float16", True)):
        record = dataclasses.replace(ann(str(identity.peer_id), 0, 6, dtype), model_id="m")
        # Signed without our field checks (an attacker signs what it likes); the view
        # refuses what our servers could not even announce.
        signed = SignedAnnouncement(record, identity.sign(record.canonical_bytes()))
        assert view.consider(signed) == accepted


# -- real servers: a liar that announces float32 and computes in bfloat16 ------------------


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    swarm.honest = swarm.start_server((0, 6))
    swarm.bf16 = swarm.start_server((0, 6), dtype=torch.bfloat16)
    swarm.honest2 = swarm.start_server((0, 6))
    swarm.liar = swarm.start_server(
        (0, 6), dtype=torch.bfloat16, server_cls=dtype_liar_server_cls()
    )
    swarm.upcaster = swarm.start_server(
        (0, 6), dtype=torch.bfloat16, server_cls=dtype_liar_server_cls(upcast=True)
    )
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def local_model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dir.parent / "hf", dtype=torch.float32
    ).eval()


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


def served(server) -> int:  # noqa: ANN001
    return server.server.ctx.served_requests


@pytest.mark.parametrize("redundancy", [1, 2])
def test_client_refuses_another_dtype_than_announced_and_goes_elsewhere(
    swarm, local_model, redundancy
):
    """Routes try the liar first; its bfloat16 answers are refused like any invalid
    answer and the float32 servers carry the generation.
    dtype_policy="float32" keeps the honest bfloat16 server out entirely."""
    ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    bf16_before = served(swarm.bf16)
    with DistributedModelForCausalLM.from_pretrained(
        swarm.model_path,
        swarm.initial_peers,
        redundancy=redundancy,
        dtype_policy="float32",
        request_timeout=10,
    ) as model:
        view = model.swarm.view
        wait_until(lambda: len(view.servers) == 5, timeout=20)
        for peer in view.servers:  # the liar is the cheapest (loopback RTTs are noise)
            view.rtts[peer] = 0.0 if peer == swarm.liar.peer_id else 0.5
        assert view.inference_route(0, 6)[0].server.peer_id == swarm.liar.peer_id
        out = model.generate(ids, max_new_tokens=4, eos_token_id=[])
        assert swarm.liar.peer_id in view.bans
        reason = view.bans[swarm.liar.peer_id].reason
        assert "announced float32 but answered in bfloat16" in reason, reason
        for event in model.trust_events:
            # Refused answers are no votes. The upcaster's float32 claims may be outvoted:
            # its bfloat16-precision answers fail the float32 tolerance.
            assert swarm.liar.peer_id not in {a.peer_id for a in event.answers}
            assert set(event.minority) <= {swarm.upcaster.peer_id}
    assert out[0].tolist() == expected_tokens(local_model, ids, 4)
    assert served(swarm.bf16) == bf16_before


def test_float32_policy_fails_clearly_without_float32_servers(tiny_model_dir: Path):
    swarm = LocalSwarm(tiny_model_dir)
    try:
        swarm.start_server((0, 6), dtype=torch.bfloat16)
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir, swarm.initial_peers, dtype_policy="float32", request_timeout=10
        ) as model:
            ids = torch.randint(3, 512, (1, 4), generator=torch.Generator().manual_seed(4))
            with pytest.raises(SwarmError, match="dtype_policy='float32' leaves out 1 server"):
                model.generate(ids, max_new_tokens=2)
            with pytest.raises(SwarmError, match="announce bfloat16"):
                model(input_ids=ids)
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def verifier(swarm: LocalSwarm, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("verifier") / "v.db"
    config = VerifierConfig(checks=CheckConfig(check_every=3600.0))
    running = start_verifier(swarm, f"sqlite:///{db}", config)
    wait_until(lambda: len(running.verifier.view.servers) == len(swarm.servers), timeout=20)
    yield running
    stop_verifier(swarm, running)


SHARES = {"forward": (0.0, 0.0), "inference": (1.0, 0.0), "backward": (0.0, 1.0)}


def spot_check(swarm, verifier, server, kind: str):  # noqa: ANN001, ANN201
    checker = verifier.verifier.checker
    inference, backward = SHARES[kind]
    checker.config = dataclasses.replace(
        checker.config, inference_share=inference, backward_share=backward, sub_span_share=0.0
    )
    return swarm.loop.run(checker.check, verifier.verifier.view.servers[server.peer_id])


@pytest.mark.parametrize("kind", list(SHARES))
def test_a_spot_check_of_a_dtype_liar_fails(swarm, verifier, kind):
    result = spot_check(swarm, verifier, swarm.liar, kind)
    assert result.outcome == FAIL and "announced float32 but answered in bfloat16" in result.detail
    assert spot_check(swarm, verifier, swarm.bf16, kind).outcome == PASS, "honest bfloat16"


@pytest.mark.parametrize("kind", ["forward", "inference"])
def test_float32_claims_are_judged_with_the_float32_tolerance(swarm, verifier, kind):
    """Casting bfloat16 answers to float32 passes every dtype check, but then the
    answers are held to float32 precision, which bfloat16 arithmetic does not reach."""
    result = spot_check(swarm, verifier, swarm.upcaster, kind)
    assert result.outcome in (FAIL, FRAUD), result.detail


# -- votes compare like with like ----------------------------------------------------------


def _fast(peer: str, dtype: str, throughput: float) -> Announcement:
    return Announcement(
        peer,
        "m",
        0,
        6,
        "0" * 64,
        dtype,
        throughput,
        (f"/ip4/10.{ord(peer[0])}.{ord(peer[1])}.1/tcp/1",),
        0.0,
        1e12,
    )


def test_replicas_of_a_vote_share_one_dtype_when_enough_servers_allow():
    # The bfloat16 servers are much faster, but 2 float32 servers can fill a k=2 vote.
    servers = [
        _fast("b1", "bfloat16", 1e6),
        _fast("b2", "bfloat16", 1e6),
        _fast("f1", "float32", 10.0),
        _fast("f2", "float32", 10.0),
    ]
    view = view_of(*servers)
    chosen = choose_replicas(view, 0, 6, 2, set())
    assert {s.dtype for s in chosen} == {"float32"}
    # One by one (a session opening its replicas): the same.
    first = choose_replicas(view, 0, 6, 1, set(), vote_size=2)
    second = choose_replicas(view, 0, 6, 1, {first[0].peer_id}, vote_size=2)
    assert {first[0].dtype, second[0].dtype} == {"float32"}
    # A spare for a vote of bfloat16 answers is bfloat16; with only one float32 server
    # left, a 2-server vote is homogeneous bfloat16 rather than mixed.
    assert choose_replicas(view, 0, 6, 1, {"b1"})[0].peer_id == "b2"
    lone = view_of(servers[0], servers[1], servers[2])
    assert {s.dtype for s in choose_replicas(lone, 0, 6, 2, set())} == {"bfloat16"}
    # Mixed only when no dtype has enough servers.
    mixed = view_of(servers[0], servers[2])
    assert {s.dtype for s in choose_replicas(mixed, 0, 6, 2, set())} == {"bfloat16", "float32"}


@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),
            st.integers(1, 6),
            st.sampled_from(["float32", "bfloat16", "float16"]),
        ),
        max_size=8,
    ),
    st.integers(1, 4),
    st.sets(st.sampled_from(["float32", "bfloat16"]), max_size=2),
)
def test_vote_dtypes_only_names_dtypes_that_can_fill_the_vote(specs, count, taken):
    servers = [
        Announcement(f"p{i}", "m", s, max(s + 1, e), "0" * 64, d, 1.0, (), 0.0, 1e12)
        for i, (s, e, d) in enumerate(specs)
    ]
    found = vote_dtypes(servers, 2, 4, count, taken)
    for dtype in found:
        covering = [s for s in servers if s.dtype == dtype and s.start <= 2 and 4 <= s.end]
        assert len(covering) >= count
    if len(taken) > 1:
        assert found == []
    elif taken:
        assert set(found) <= taken
    elif "float32" in found:
        assert found[0] == "float32"
    assert len(found) == len(set(found))
