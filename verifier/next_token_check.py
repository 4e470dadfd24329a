"""The verifier's next-token check: the rest of the model run on a server's answer.

A verifier holds every block and the LM head, so for any span it can run blocks
end..N and the head on the server's output and on its own reference, and compare the
next-token logits (protocol/next_token.py) at every position whose output becomes a
next token: the last token of each sequence, of every step of a session. An answer that
passes the hidden-state comparator but moves the next token beyond what honest
arithmetic does (steering) fails the check: a failed check, never proof by itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ClientParts
from trustswarm.protocol.next_token import compare_next_token, next_token_tolerance

if TYPE_CHECKING:
    from .judge import Recomputed


class NextTokenCheck:
    def __init__(self, runner: BlockRunner, head: ClientParts) -> None:
        if runner.end != runner.model_dir.num_blocks:
            raise ValueError("the next-token check needs the runner to reach the last block")
        self.runner = runner
        self.head = head

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

    def check(self, answers: list[torch.Tensor], rec: Recomputed, end: int) -> str:
        """'' when the answers lead to the reference's next tokens (within the tolerance
        of the answers' dtype), else the reason."""
        tolerance = next_token_tolerance(str(answers[0].dtype).removeprefix("torch."))
        verdict = compare_next_token(
            self._downstream(answers, rec, end), self._downstream(rec.outputs, rec, end), tolerance
        )
        return "" if verdict.agree else f"next token: {verdict.reason}"
