"""Judging evidence: recompute a signed answer with the reference weights and compare.

Used for spot-checks and for clients' fraud reports alike. The evidence is opened first
(signatures and digests, `Evidence.open`); the request is read with the same validation
a server applies; the answer is recomputed from the request's own tensors (for an
inference step: steps 0..n replayed into a fresh cache), and each signed output is
compared with the reference by the tolerance comparator. A signed output that the
comparator rejects is a fraud proof against its signer.

Torch only; call `Judge.judge` from a worker thread.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from trustswarm.models.runner import BlockRunner, RunnerError
from trustswarm.node.config import ServerConfig
from trustswarm.node.requests import (
    attention_mask_of,
    hidden_states_of,
    positions_of,
    validate_span,
)
from trustswarm.protocol.comparator import Tolerance, compare, tolerance_for
from trustswarm.protocol.errors import ProtocolError, TrustswarmError
from trustswarm.protocol.evidence import (
    DisagreementReport,
    Evidence,
    EvidenceError,
    OpenedExchange,
    ReplicaAnswer,
)
from trustswarm.protocol.limits import DEFAULT_LIMITS, Limits
from trustswarm.protocol.protocols import PROTOCOL_VERSION

# Requests are read with a server's default limits, a little wider: an honest server
# never signs more than its own limits allow, and the rate limit bounds our compute.
JUDGE_CONFIG = ServerConfig(max_batch=64, max_tokens_per_request=16384)


class EvidenceRejected(TrustswarmError):
    """Evidence we cannot judge: forged, about other weights, or an invalid request."""


@dataclass(frozen=True)
class Judgement:
    signer: str
    kind: str
    start: int
    end: int
    steps: int  # exchanges recomputed
    wrong: bool  # True: the signer signed an output the comparator rejects
    reason: str  # why it is wrong, or "" when every output agreed
    worst_error: float  # largest per-token relative error seen (nan if none computed)
    # Wrong even with every tolerance multiplied by PROOF_FACTOR: proof, grounds for a
    # ban. Honest bfloat16 answers fail the comparator on ~0.2 % of real prompts (see
    # bench/results/calibration.md; worst honest 1.7x the threshold): such a miss counts
    # as a failed check (the score model absorbs rare ones), never as fraud.
    proven: bool = False


PROOF_FACTOR = 2.0


def proof_tolerance(a: torch.Tensor, b: torch.Tensor, kind: str) -> Tolerance:
    base = tolerance_for(a, b, kind)
    return dataclasses.replace(
        base,
        token_rel_error=base.token_rel_error * PROOF_FACTOR,
        outlier_token_error=max(base.outlier_token_error, base.token_rel_error) * PROOF_FACTOR,
        max_abs_ratio=base.max_abs_ratio * PROOF_FACTOR,
    )


class Judge:
    def __init__(
        self,
        runner: BlockRunner,
        model_id: str,
        config: ServerConfig = JUDGE_CONFIG,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.runner = runner
        self.model_id = model_id
        self.span_digest = runner.model_dir.manifest.span_digest
        self.config = config
        self.limits = limits

    def open(self, evidence: Evidence) -> list[OpenedExchange]:
        """Check signatures, digests and that the statements are about our weights."""
        try:
            opened = evidence.open(self.limits)
        except EvidenceError as exc:
            raise EvidenceRejected(str(exc)) from None
        except ProtocolError as exc:  # undecodable request or answer
            raise EvidenceRejected(f"malformed exchange: {exc}") from None
        s = opened[0].statement
        if s.model_id != self.model_id:
            raise EvidenceRejected(f"evidence is about model {s.model_id!r}, not ours")
        if s.version != PROTOCOL_VERSION:
            raise EvidenceRejected(f"statement version {s.version!r} is not {PROTOCOL_VERSION}")
        if not 0 <= s.start < s.end <= self.runner.end:
            raise EvidenceRejected(f"span {s.start}:{s.end} is outside the model")
        if s.weights_digest != self.span_digest(s.start, s.end):
            # Clients refuse such answers; they are not about the reference weights.
            raise EvidenceRejected("the statement names other weights than the reference")
        return opened

    def judge(self, evidence: Evidence) -> Judgement:
        opened = self.open(evidence)
        s = opened[0].statement
        try:
            if s.kind == "inference":
                return self._judge_session(opened)
            return self._judge_one(opened[0])
        except (ProtocolError, RunnerError) as exc:
            raise EvidenceRejected(f"the request is invalid: {exc}") from None

    # -- recomputation ------------------------------------------------------------------

    def _verdict(
        self, opened: list[OpenedExchange], outputs: list[torch.Tensor], kind: str
    ) -> Judgement:
        s = opened[0].statement
        worst = float("nan")
        for i, (item, reference) in enumerate(zip(opened, outputs, strict=True)):
            verdict = compare(item.output, reference, kind=kind)
            if not math.isnan(verdict.worst_token_error):
                worst = max(verdict.worst_token_error, 0.0 if math.isnan(worst) else worst)
            if not verdict.agree:
                where = f"step {i}: " if s.kind == "inference" else ""
                tolerance = proof_tolerance(item.output, reference, kind)
                proven = not compare(item.output, reference, kind=kind, tolerance=tolerance).agree
                return Judgement(
                    s.server_peer_id,
                    s.kind,
                    s.start,
                    s.end,
                    i + 1,
                    True,
                    where + verdict.reason,
                    worst,
                    proven,
                )
        return Judgement(s.server_peer_id, s.kind, s.start, s.end, len(opened), False, "", worst)

    def _judge_one(self, item: OpenedExchange) -> Judgement:
        s, request = item.statement, item.request
        start, end = validate_span(request, self.runner.start, self.runner.end)
        if (start, end) != (s.start, s.end):
            raise EvidenceRejected("the statement's span is not the request's span")
        hidden = hidden_states_of(request, self.runner.hidden_size, self.config)
        batch, tokens = hidden.shape[:2]
        positions = positions_of(request, batch, tokens)
        mask = attention_mask_of(request, batch, tokens)
        if s.kind == "forward":
            out = self.runner.forward(hidden, positions, mask, start, end)
            return self._verdict([item], [out], "hidden")
        grad = request.tensor("grad_outputs")
        if grad.shape != hidden.shape or not grad.is_floating_point():
            raise ProtocolError(f"grad_outputs must match hidden_states {list(hidden.shape)}")
        out = self.runner.backward(hidden, grad, positions, mask, start, end)
        return self._verdict([item], [out], "grad")

    def _judge_session(self, opened: list[OpenedExchange]) -> Judgement:
        s = opened[0].statement
        hidden_all = [
            hidden_states_of(o.request, self.runner.hidden_size, self.config) for o in opened
        ]
        batch = hidden_all[0].shape[0]
        total = sum(h.shape[1] for h in hidden_all)
        cache = self.runner.new_cache(batch, total, s.start, s.end)
        outputs = []
        for item, hidden in zip(opened, hidden_all, strict=True):
            if item.request.meta.get("session_id") != s.session_id:
                raise ProtocolError("a step's request names another session")
            if item.request.int_field("step") != item.statement.step:
                raise ProtocolError("a step's request names another step")
            if hidden.shape[0] != batch:
                raise ProtocolError(f"session batch is {batch}, got {hidden.shape[0]}")
            tokens = hidden.shape[1]
            positions = positions_of(item.request, batch, tokens)
            mask = attention_mask_of(item.request, batch, cache.length + tokens)
            outputs.append(self.runner.step(cache, hidden, positions, mask))
        return self._verdict(opened, outputs, "hidden")


def proof_bytes(model_id: str, judgement: Judgement, evidence: Evidence) -> bytes:
    """The evidence as a self-contained report (what `ReputationStore.ban` keeps)."""
    return DisagreementReport(
        model_id=model_id,
        start=judgement.start,
        end=judgement.end,
        kind=judgement.kind,
        answers=(ReplicaAnswer(judgement.signer, evidence, 0),),
        accepted_cluster=None,
        resolution="unresolved",
        detail=f"verifier recomputation: {judgement.reason}"[:4000],
    ).to_bytes()
