"""The verifier's next-token check: the rest of the model run on a server's answer.

A verifier holds every block and the LM head, so for any span it can run blocks
end..N and the head on the server's output and on its own reference, and compare the
next-token logits (protocol/next_token.py) at every position whose output becomes a
next token: the last token of each sequence, of every step of a session. An answer that
passes the hidden-state comparator but moves the next token beyond what honest
arithmetic does (steering) fails the check: a failed check, never proof by itself.

Two references: the float32 one, held to a near-tie of REFERENCE_TOLERANCES (tight,
since steering lives in that allowance), and, for a bfloat16/float16 answer, the span
recomputed in the answer's own dtype, held to SAME_DTYPE_TOLERANCE: an honest server
reproduces that arithmetic, so its own rounding flips never fail the check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ClientParts
from trustswarm.protocol.codec import dtype_name
from trustswarm.protocol.next_token import (
    REFERENCE_TOLERANCES,
    SAME_DTYPE_TOLERANCE,
    compare_next_token,
)

if TYPE_CHECKING:
    from .judge import Recomputed


def with_reference_at(
    ill: torch.Tensor | None, output: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    """`output` with the tokens where `ill` [B, T] holds set to `reference`'s values."""
    if ill is None:
        return output
    return torch.where(ill.unsqueeze(-1), reference.to(output.dtype), output)


class NextTokenCheck:
    def __init__(self, runner: BlockRunner, head: ClientParts) -> None:
        if runner.end != runner.model_dir.num_blocks:
            raise ValueError("the next-token check needs the runner to reach the last block")
        self.runner = runner
        self.head = head
        self._runners: dict[torch.dtype, BlockRunner] = {}  # loaded on first use

    def _runner_in(self, dtype: torch.dtype) -> BlockRunner:
        if dtype not in self._runners:
            model_dir = self.runner.model_dir
            self._runners[dtype] = BlockRunner(model_dir, 0, model_dir.num_blocks, dtype)
        return self._runners[dtype]

    def recompute_in(
        self, dtype: torch.dtype, rec: Recomputed, start: int, end: int
    ) -> list[torch.Tensor]:
        """The span's answers recomputed in `dtype`, as an honest server computes them."""
        runner = self._runner_in(dtype)
        steps = zip(rec.inputs, rec.positions, rec.masks, strict=True)
        if not rec.session:
            return [runner.forward(x, pos, mask, start, end) for x, pos, mask in steps]
        batch, total = rec.inputs[0].shape[0], sum(x.shape[1] for x in rec.inputs)
        cache = runner.new_cache(batch, total, start, end)
        return [runner.step(cache, x, pos, mask) for x, pos, mask in steps]

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.head.lm_head(self.head.norm(last_hidden.float())).float()

    def _downstream(self, outputs: list[torch.Tensor], rec: Recomputed, end: int) -> torch.Tensor:
        """Logits [positions, vocab] at the last token of each row of each exchange."""
        n = self.runner.end
        lasts = []
        if rec.session and end < n:
            batch = outputs[0].shape[0]
            total = sum(o.shape[1] for o in outputs)
            cache = self.runner.new_cache(batch, total, end, n)
            for out, pos, mask in zip(outputs, rec.positions, rec.masks, strict=True):
                lasts.append(self.runner.step(cache, out.float(), pos, mask)[:, -1])
        else:
            for out, pos, mask in zip(outputs, rec.positions, rec.masks, strict=True):
                h = out.float()
                if end < n:
                    h = self.runner.forward(h, pos, mask, end, n)
                lasts.append(h[:, -1])
        return self._logits(torch.cat(lasts, dim=0))

    def check(
        self,
        answers: list[torch.Tensor],
        rec: Recomputed,
        start: int,
        end: int,
        ill: list[torch.Tensor | None] | None = None,
    ) -> str:
        """'' when the answers lead to the reference's next tokens, else the reason.
        `ill`: per exchange, the tokens the answers carry the reference's values at (the
        judge's ill-conditioned tokens); the same-dtype replay gets the same substitution,
        or it could not reproduce an honest answer (it did not: 3 of 785 honest audits)."""
        dtype = answers[0].dtype
        logits = self._downstream(answers, rec, end)
        tolerance = REFERENCE_TOLERANCES.get(dtype_name(dtype), REFERENCE_TOLERANCES["float32"])
        verdict = compare_next_token(logits, self._downstream(rec.outputs, rec, end), tolerance)
        if verdict.agree:
            return ""
        if dtype != torch.float32 and rec.inputs:
            same = self.recompute_in(dtype, rec, start, end)
            if ill is not None:
                same = [
                    with_reference_at(m, x, ref)
                    for m, x, ref in zip(ill, same, rec.outputs, strict=True)
                ]
            same = self._downstream(same, rec, end)
            if compare_next_token(logits, same, SAME_DTYPE_TOLERANCE).agree:
                return ""
        return f"next token: {verdict.reason}"
