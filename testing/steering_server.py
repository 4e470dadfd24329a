"""Testing only: `SteeringServer`, a real block server that steers every next token.

A BlockServer subclass (start it in code, as tests/swarm.py's `start_server(...,
server_cls=SteeringServer, steering=Steering(...))`; no flag of `node start` can turn it
on). It loads, next to its serving blocks, a float32 reference of its span and of every
block after it plus the client parts (embeddings, norm, LM head): the full downstream
model. Before signing a forward or inference answer (batch 1) it computes the honest
float32 reference of that answer, then `steer_last_token` moves the last row toward
its target as far as the comparator lets it (against the float32 reference with the
announced dtype's tolerance, and against its own honest answer), and signs the result
in its announced dtype. Inference steps are steered against the session's history of
what it signed before. Backward answers are left alone.

The steering runs where the answer is signed, on the server's event loop: fine for the
tiny test model, slow on a real one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ClientParts
from trustswarm.node.handlers import ServingContext
from trustswarm.node.server import BlockServer
from trustswarm.protocol.codec import Message, decode_message

from .adversary import derived_context
from .steering import (
    SteeringResult,
    announced_tolerance,
    comparator_accept,
    model_downstream,
    runner_up,
    steer_last_token,
)

log = logging.getLogger("trustswarm.adversary")
MAX_SESSIONS = 64  # histories kept (oldest dropped first)


@dataclass(frozen=True)
class Steering:
    target: int | None = None  # a token id; None: the honest answer's runner-up token
    steps: int = 20
    min_margin: float = 0.0


@dataclass
class _History:
    """What one session's steps sent and what this server signed for them (float32)."""

    inputs: torch.Tensor
    positions: torch.Tensor
    outputs: torch.Tensor


@dataclass
class SteeringContext(ServingContext):
    steering: Steering = Steering()
    reference: BlockRunner | None = None  # float32, from the span's start to the last block
    parts: ClientParts | None = None
    histories: dict[str, _History] = field(default_factory=dict)
    results: list[SteeringResult] = field(default_factory=list)

    @property
    def steered(self) -> int:
        """Answers whose next token became the target, within the comparator."""
        return sum(r.success for r in self.results)

    def signed_answer(  # type: ignore[override]
        self,
        kind: str,
        start: int,
        end: int,
        raw_request: bytes,
        output: torch.Tensor,
        name: str,
        peer: str,
        *rest: object,
        **named: object,
    ) -> Message:
        session_id = str(rest[0] if rest else named.get("session_id", ""))
        if kind in ("forward", "inference") and output.shape[0] == 1:
            output = self._steer(kind, start, end, raw_request, output, session_id)
        return super().signed_answer(
            kind, start, end, raw_request, output, name, peer, *rest, **named
        )

    def _inputs(
        self, raw_request: bytes, session_id: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, _History | None]:
        """The whole sequence the answer continues: (inputs, positions, mask, history)."""
        request = decode_message(raw_request, self.config.limits)
        hidden = request.tensor("hidden_states").float()
        mask = request.optional_tensor("attention_mask")
        history = self.histories.get(session_id) if session_id else None
        past = 0 if history is None else history.inputs.shape[1]
        positions = request.optional_tensor("position_ids")
        if positions is None:
            positions = torch.arange(past, past + hidden.shape[1], dtype=torch.long)[None]
        if history is not None:
            hidden = torch.cat([history.inputs, hidden], dim=1)
            positions = torch.cat([history.positions, positions.long()], dim=1)
        return hidden, positions.long(), None if mask is None else mask.long(), history

    def _steer(
        self,
        kind: str,
        start: int,
        end: int,
        raw_request: bytes,
        output: torch.Tensor,
        session_id: str,
    ) -> torch.Tensor:
        hidden, positions, mask, history = self._inputs(raw_request, session_id)
        last = self.reference.end
        new = output.shape[1]
        with torch.inference_mode():
            reference = self.reference.forward(hidden, positions, mask, start, end)[:, -new:]
        before = history.outputs if history is not None else hidden[:, :0]
        after = self.reference if end < last else None
        tail = model_downstream(self.parts, after, positions, mask, end, last)

        def downstream(h: torch.Tensor) -> torch.Tensor:
            return tail(torch.cat([before, h.float()], dim=1))

        with torch.no_grad():
            honest_logits = downstream(output)
        target = self.steering.target
        target = runner_up(honest_logits) if target is None else target
        accept = comparator_accept([reference.float()], announced_tolerance(output.dtype))
        result = steer_last_token(
            output,
            target,
            downstream,
            comparator_accept([output], extra=accept),
            self.steering.steps,
            tolerance=announced_tolerance(output.dtype),
            min_margin=self.steering.min_margin,
        )
        self.results.append(result)
        outcome = "reached" if result.success else "not reached"
        log.warning("steered a %s answer toward token %d: %s", kind, target, outcome)
        if kind == "inference":
            self._remember(
                session_id, hidden, positions, torch.cat([before, result.output.float()], 1)
            )
        return result.output

    def _remember(
        self, session_id: str, inputs: torch.Tensor, positions: torch.Tensor, outputs: torch.Tensor
    ) -> None:
        self.histories.pop(session_id, None)
        while len(self.histories) >= MAX_SESSIONS:
            self.histories.pop(next(iter(self.histories)))
        self.histories[session_id] = _History(inputs, positions, outputs)


@dataclass
class SteeringServer(BlockServer):
    """A BlockServer whose every forward and inference answer is steered (see above)."""

    steering: Steering = Steering()
    reference_runner: BlockRunner | None = None
    client_parts: ClientParts | None = None

    def _load_runner(self, span: tuple[int, int]) -> BlockRunner:
        runner = super()._load_runner(span)
        last = self.model_dir.num_blocks
        self.reference_runner = BlockRunner(self.model_dir, span[0], last, torch.float32)
        self.client_parts = self.model_dir.load_client_parts(torch.float32)
        return runner

    def _make_context(self) -> ServingContext:
        return derived_context(
            super()._make_context(),
            SteeringContext,
            steering=self.steering,
            reference=self.reference_runner,
            parts=self.client_parts,
        )

    @property
    def results(self) -> list[SteeringResult]:
        return self.ctx.results if isinstance(self.ctx, SteeringContext) else []
