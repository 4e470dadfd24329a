"""End to end on loopback (tiny model): 3 honest servers, 1 adversary tampering with 20 %
of its answers (and announcing a boasted throughput, so routes prefer it), 1 verifier at
default settings, 1 client with redundancy=1 that trusts the verifier.

Measured: seconds from swarm start until the client stops routing to the adversary (it
is no longer usable: banned by the trusted verifier; goal <= 30 s), how many honest
servers were penalised (goal 0), and that the client's greedy output afterwards equals
the local reference model's token for token."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.adversary import Tamper, adversarial_server_cls
from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier, wait_until  # noqa: F401 - fixture
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.protocol.identity import Identity
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.verifier.daemon import VerifierConfig

pytestmark = [pytest.mark.timeout(150), pytest.mark.usefixtures("one_torch_thread")]
GOAL_SECONDS = 30.0


def test_verifier_gets_a_cheater_excluded(tiny_model_dir: Path, tmp_path: Path):
    began = time.monotonic()
    swarm = LocalSwarm(tiny_model_dir)
    client = verifier = None
    try:
        honest = [swarm.start_server(span) for span in [(0, 2), (2, 4), (4, 6)]]
        cheat = swarm.start_server(
            (0, 6),
            server_cls=adversarial_server_cls(
                Tamper("noise", amount=0.05, fraction=0.2, seed=7), boast=20.0
            ),
        )
        verifier_identity = Identity.generate()
        client = DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir,
            swarm.initial_peers,
            trusted_verifiers=[str(verifier_identity.peer_id)],
            redundancy=1,
        )
        view = client.swarm.view
        wait_until(lambda: cheat.peer_id in view.servers, timeout=20)
        first_route = [hop.server.peer_id for hop in view.inference_route(0, 6)]
        assert cheat.peer_id in first_route  # the test could fail: the cheat was in use
        verifier = start_verifier(
            swarm, f"sqlite:///{tmp_path / 'v.db'}", VerifierConfig(), verifier_identity
        )
        ready = time.monotonic() - began  # servers, client and verifier all up

        def excluded() -> bool:
            usable = {a.peer_id for a in view.usable()}
            return cheat.peer_id not in usable and len(usable) == 3

        wait_until(excluded, timeout=60, every=0.05)
        seconds = time.monotonic() - began
        route = [hop.server.peer_id for hop in view.inference_route(0, 6)]
        results = list(verifier.verifier.results)
        model_id = verifier.verifier.model_id
        penalised = [
            s.peer_id
            for s in honest
            if (rep := verifier.store.get(s.peer_id, model_id)) is not None
            and (rep.failures or rep.state == "banned")
        ] + [s.peer_id for s in honest if not view.trust.allowed(s.peer_id)]
        print(
            f"\n[verifier e2e] cheat excluded after {seconds:.1f} s from swarm start "
            f"({seconds - ready:.1f} s after all nodes were up at {ready:.1f} s) "
            f"({len(results)} checks, {sum(r.peer_id == cheat.peer_id for r in results)} of "
            f"the cheat, {cheat.server.tampered} tampered answers); honest penalised: "
            f"{len(set(penalised))}"
        )
        assert cheat.peer_id not in route
        assert verifier.store.get(cheat.peer_id, model_id).state == "banned"
        assert not set(penalised)
        assert seconds <= GOAL_SECONDS

        # After exclusion the client's output is the honest output, token for token.
        reference = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir.parent / "hf", dtype=torch.float32
        ).eval()
        ids = torch.randint(1, 512, (1, 12), generator=torch.Generator().manual_seed(3))
        served_before = cheat.server.ctx.served_requests
        with torch.no_grad():
            expected = reference.generate(
                ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids)
            )
        out = client.generate(ids, max_new_tokens=10)
        assert torch.equal(out, expected)
        assert cheat.server.ctx.served_requests == served_before  # nothing went to the cheat
    finally:
        if client is not None:
            client.close()
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()
