"""A client with redundancy sends its disagreement reports to its trusted verifiers;
the verifier recomputes, bans the outvoted server, and the ban reaches other clients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.adversary import Tamper, adversarial_server_cls
from tests.verifier_env import one_torch_thread, start_verifier, stop_verifier, wait_until  # noqa: F401 - fixture
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.verifier.daemon import VerifierConfig
from trustswarm.verifier.spotcheck import CheckConfig

pytestmark = [pytest.mark.timeout(150), pytest.mark.usefixtures("one_torch_thread")]
QUIET = CheckConfig(check_every=3600.0)  # no spot-checks: only the report can ban


def test_disagreement_reports_reach_the_verifier_and_ban_the_cheat(
    tiny_model_dir: Path, tmp_path: Path
):
    swarm = LocalSwarm(tiny_model_dir)
    verifier = None
    try:
        honest = [swarm.start_server((0, 6)) for _ in range(2)]
        cheat = swarm.start_server(
            (0, 6), server_cls=adversarial_server_cls(Tamper("scale", amount=0.05))
        )
        verifier = start_verifier(
            swarm, f"sqlite:///{tmp_path / 'v.db'}", VerifierConfig(checks=QUIET)
        )
        model_id = verifier.verifier.model_id
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir,
            swarm.initial_peers,
            redundancy=3,
            trusted_verifiers=[verifier.addrs[0]],  # a multiaddr: the client can dial it
        ) as client:
            with torch.no_grad():
                client(input_ids=torch.tensor([[5, 6, 7, 8]]))
            assert client.trust_events and client.trust_events[0].minority == (cheat.peer_id,)

            def banned() -> bool:
                rep = verifier.store.get(cheat.peer_id, model_id)
                return rep is not None and rep.state == "banned"

            wait_until(banned, timeout=60)
            for server in honest:
                rep = verifier.store.get(server.peer_id, model_id)
                assert rep is None or rep.state != "banned"
        # A new client that trusts the verifier never routes to the cheat.
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir, swarm.initial_peers, trusted_verifiers=[verifier.peer_id]
        ) as other:
            wait_until(
                lambda: cheat.peer_id not in {a.peer_id for a in other.swarm.view.usable()},
                timeout=60,
            )
    finally:
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()
