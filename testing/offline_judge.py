"""Testing only: the verifier's Judge on answers signed off-network, for the optimizing
adversaries' benches and tests (a server's ServingContext signs under a throwaway
identity; the evidence is judged exactly as a report or an audit would be)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from trustswarm.client.rpc import SpanCall, request_message
from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ClientParts, ModelDir
from trustswarm.node.config import ServerConfig
from trustswarm.node.handlers import ServingContext
from trustswarm.protocol.codec import encode_message
from trustswarm.protocol.evidence import Evidence, SignedExchange
from trustswarm.protocol.identity import Identity
from trustswarm.verifier.challenges import ChallengeFactory
from trustswarm.verifier.conditioning import NaturalConditioning
from trustswarm.verifier.judge import Judge

JUDGE_FEATURES = ["conditioning", "head"]


def verifier_judge(md: ModelDir, full: BlockRunner, parts: ClientParts) -> Judge:
    """The Judge as the verifier daemon builds it: the LM head (next-token check) and the
    natural conditioning of each span (the error floor for chosen inputs)."""
    factory = ChallengeFactory(md, full, rng=random.Random(0))
    return Judge(full, md.manifest.model_id, head=parts, conditioning=NaturalConditioning(factory))


@dataclass(frozen=True)
class Verdict:
    wrong: bool
    proven: bool
    inconclusive: bool
    reason: str


class OfflineJudge:
    """Sign an answer as a server would and judge the evidence, with no network."""

    def __init__(self, md: ModelDir, full: BlockRunner, parts: ClientParts) -> None:
        self.md, self.model_id = md, md.manifest.model_id
        self.identity = Identity.generate()  # throwaway: what the "server" signs with
        self.ctx = ServingContext(
            identity=self.identity,
            runner=full,
            model_id=self.model_id,
            span_digest=md.manifest.span_digest,
            config=ServerConfig(),
            info=dict,
        )
        self.judge = verifier_judge(md, full, parts)

    def judged(self, span: tuple[int, int], hidden: torch.Tensor, output: torch.Tensor) -> Verdict:
        """`output` signed as the answer to a forward request for `hidden`, judged."""
        start, end = span
        dtype = str(output.dtype).removeprefix("torch.")
        call = SpanCall(self.identity.peer_id, self.model_id, start, end, "", dtype)
        raw = encode_message(request_message(call, {"hidden_states": hidden.float().contiguous()}))
        answer = self.ctx.signed_answer("forward", start, end, raw, output, "hidden_states", "-")
        j = self.judge.judge(Evidence((SignedExchange(raw, encode_message(answer)),)))
        return Verdict(j.wrong, j.proven, bool(getattr(j, "inconclusive", False)), j.reason[:200])
