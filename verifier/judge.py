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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trustswarm.models.runner import BlockRunner, RunnerError
from trustswarm.models.store import ClientParts
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

from .next_token_check import NextTokenCheck, with_reference_at

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
    reason: str  # why it is wrong (or inconclusive), or "" when every output agreed
    worst_error: float  # largest per-token relative error seen (nan if none computed)
    # Wrong even with every tolerance multiplied by PROOF_FACTOR, on well-conditioned
    # tokens: proof, grounds for a ban. Honest bfloat16 answers fail the comparator on
    # ~0.2 % of real prompts (bench/results/calibration.md): such a miss counts as a
    # failed check (the score model absorbs rare ones), never as fraud.
    proven: bool = False
    # The answer differs from the reference only on ill-conditioned tokens (inputs no
    # natural prompt produces, where honest rounding is not bounded by the output's size):
    # no verdict either way. Never a failure, never a ban.
    inconclusive: bool = False


PROOF_FACTOR = 2.0


def proof_tolerance(a: torch.Tensor, b: torch.Tensor, kind: str) -> Tolerance:
    base = tolerance_for(a, b, kind)
    return dataclasses.replace(
        base,
        token_rel_error=base.token_rel_error * PROOF_FACTOR,
        outlier_token_error=max(base.outlier_token_error, base.token_rel_error) * PROOF_FACTOR,
        max_abs_ratio=base.max_abs_ratio * PROOF_FACTOR,
        protected_max_abs_ratio=base.protected_guard * PROOF_FACTOR,
    )


def condition_floor(scale: torch.Tensor | None, kappa: float | None) -> torch.Tensor | None:
    """The per-token error-scale floor: the residual scale over the span's natural
    conditioning bound (verifier/conditioning.py); None without either."""
    if scale is None or kappa is None:
        return None
    return scale / kappa


def ill_conditioned(reference: torch.Tensor, floor: torch.Tensor | None) -> torch.Tensor:
    """Per token of `reference` [B, T, H]: True where its RMS is below the floor (the
    terms summed into it nearly cancel), or the floor is not finite."""
    if floor is None:
        return torch.zeros(reference.shape[:-1], dtype=torch.bool)
    rms = reference.detach().float().pow(2).mean(-1).sqrt()
    return ~(floor <= rms)


@dataclass(frozen=True)
class HiddenVerdict:
    status: str  # "ok", "wrong" or "inconclusive"
    reason: str
    worst: float
    judged: torch.Tensor  # the output with ill-conditioned tokens set to the reference
    proven: bool = False
    ill: torch.Tensor | None = None  # [B, T] the tokens set to the reference, if any


def judge_hidden(
    output: torch.Tensor, reference: torch.Tensor, floor: torch.Tensor | None, kind: str
) -> HiddenVerdict:
    """The comparator's verdict, each token measured against at least its floor: what
    fails only without the floor is inconclusive (never a failure, never a ban)."""
    verdict = compare(output, reference, kind=kind)
    ill: torch.Tensor | None = ill_conditioned(reference, floor)
    judged = output
    if bool(ill.any()):  # the next-token check must not see them either
        judged = with_reference_at(ill, output, reference)
    else:
        ill = None
    if verdict.agree:
        return HiddenVerdict("ok", "", verdict.worst_token_error, judged, ill=ill)
    floored = compare(output, reference, kind=kind, token_floor=floor)
    if floored.agree:
        return HiddenVerdict(
            "inconclusive",
            f"{verdict.reason}, but within the tolerance of the sizes this input summed "
            "(an input no natural prompt produces)",
            floored.worst_token_error,
            judged,
            ill=ill,
        )
    tolerance = proof_tolerance(output, reference, kind)
    proof = compare(output, reference, kind=kind, tolerance=tolerance, token_floor=floor)
    return HiddenVerdict(
        "wrong", floored.reason, floored.worst_token_error, judged, not proof.agree, ill
    )


@dataclass
class Recomputed:
    """The reference answer of every exchange, with what the next-token check needs."""

    outputs: list[torch.Tensor]
    scales: list[torch.Tensor | None]
    positions: list[torch.Tensor | None]
    masks: list[torch.Tensor | None]
    session: bool = False
    inputs: list[torch.Tensor] = dataclasses.field(default_factory=list)  # as requested


class Judge:
    def __init__(
        self,
        runner: BlockRunner,
        model_id: str,
        config: ServerConfig = JUDGE_CONFIG,
        limits: Limits = DEFAULT_LIMITS,
        head: ClientParts | None = None,
        conditioning: Callable[[str, int, int], float] | None = None,
    ) -> None:
        self.runner = runner
        self.model_id = model_id
        self.span_digest = runner.model_dir.manifest.span_digest
        self.config = config
        self.limits = limits
        # The next-token check needs every block after a span and the LM head.
        self.next_token = NextTokenCheck(runner, head) if head is not None else None
        # kappa(kind, start, end) of natural inputs: the floor of every error scale.
        self.conditioning = conditioning

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

    def _verdict(self, opened: list[OpenedExchange], rec: Recomputed, kind: str) -> Judgement:
        s = opened[0].statement
        worst = float("nan")
        inconclusive = ""
        judged, ills = [], []

        def judgement(steps: int, wrong: bool, reason: str, **extra: bool) -> Judgement:
            return Judgement(
                s.server_peer_id, s.kind, s.start, s.end, steps, wrong, reason, worst, **extra
            )

        same_dtype: list[torch.Tensor] | None = None
        for i, item in enumerate(opened):
            kappa = self.conditioning(kind, s.start, s.end) if self.conditioning else None
            floor = condition_floor(rec.scales[i], kappa)
            hv = judge_hidden(item.output, rec.outputs[i], floor, kind)
            if hv.status == "wrong" and self._same_dtype_possible(item.output, rec, kind):
                # Far from the float32 reference, but is it what an honest server computing
                # in the announced dtype signs? Then it is no evidence of anything.
                if same_dtype is None:
                    same_dtype = self.next_token.recompute_in(
                        item.output.dtype, rec, s.start, s.end
                    )
                if compare(item.output, same_dtype[i], kind=kind).agree:
                    hv = HiddenVerdict("ok", "", hv.worst, hv.judged)
            judged.append(hv.judged)
            ills.append(hv.ill)
            if not math.isnan(hv.worst):
                worst = max(hv.worst, 0.0 if math.isnan(worst) else worst)
            where = f"step {i}: " if s.kind == "inference" else ""
            if hv.status == "wrong":
                return judgement(i + 1, True, where + hv.reason, proven=hv.proven)
            if hv.status == "inconclusive" and not inconclusive:
                inconclusive = where + hv.reason
        if kind == "hidden" and self.next_token is not None:
            # On the judged outputs: an ill-conditioned token cannot fail this either.
            reason = self.next_token.check(judged, rec, s.start, s.end, ills)
            if reason:
                return judgement(len(opened), True, reason)
        if inconclusive:
            return judgement(len(opened), False, inconclusive, inconclusive=True)
        return judgement(len(opened), False, "")

    def _same_dtype_possible(self, output: torch.Tensor, rec: Recomputed, kind: str) -> bool:
        return (
            kind == "hidden"
            and output.dtype != torch.float32
            and self.next_token is not None
            and bool(rec.inputs)
        )

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
            out, scale = self.runner.forward_with_scale(hidden, positions, mask, start, end)
            rec = Recomputed([out], [scale], [positions], [mask], inputs=[hidden])
            return self._verdict([item], rec, "hidden")
        grad = request.tensor("grad_outputs")
        if grad.shape != hidden.shape or not grad.is_floating_point():
            raise ProtocolError(f"grad_outputs must match hidden_states {list(hidden.shape)}")
        out, scale = self.runner.backward_with_scale(hidden, grad, positions, mask, start, end)
        return self._verdict([item], Recomputed([out], [scale], [None], [None]), "grad")

    def _judge_session(self, opened: list[OpenedExchange]) -> Judgement:
        s = opened[0].statement
        hidden_all = [
            hidden_states_of(o.request, self.runner.hidden_size, self.config) for o in opened
        ]
        batch = hidden_all[0].shape[0]
        total = sum(h.shape[1] for h in hidden_all)
        cache = self.runner.new_cache(batch, total, s.start, s.end)
        rec = Recomputed([], [], [], [], session=True)
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
            out, scale = self.runner.step_with_scale(cache, hidden, positions, mask)
            rec.outputs.append(out)
            rec.scales.append(scale)
            rec.positions.append(positions)
            rec.masks.append(mask)
            rec.inputs.append(hidden)
        return self._verdict(opened, rec, "hidden")


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
