"""The client's LM head as a judge of votes on the last span of blocks.

A span that ends at the model's last block produces the final hidden states; the client
holds the final norm and LM head, so replicas of such a span can be compared on what
matters, the next-token logits (protocol/next_token.py), and not only on the hidden
states, where a steering server hides inside the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VoteHead:
    norm: nn.Module
    lm_head: nn.Module
    num_blocks: int

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, hidden] final hidden states -> [batch, vocab] logits of the
        last token of each row, in float32."""
        with torch.inference_mode():
            last = hidden[:, -1].to(self.norm.weight.dtype)
            return self.lm_head(self.norm(last)).float()

    def for_span(self, end: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The logits function for answers of a span ending at `end` (None unless last)."""
        return self.logits if end == self.num_blocks else None
