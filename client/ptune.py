"""Prompt tuning: trainable soft-prompt embeddings kept on the client.

The soft prompt is `pre_seq_len` vectors of the model's hidden size, prepended to the
input embeddings of every forward pass and to the prefill of every inference session.
The servers see ordinary hidden states and never learn that a prompt is being tuned;
gradients reach the prompt through the swarm's backward RPC.

Conventions (as Petals): the prompt takes positions 0..pre_seq_len-1, the real tokens
follow; prompt positions are attended to (mask 1) and carry label -100; logits are
returned for the real tokens only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from trustswarm.protocol.errors import TrustswarmError

if TYPE_CHECKING:
    from .model import SyncInferenceSession

TUNING_MODES = (None, "ptune")
MAX_PRE_SEQ_LEN = 4096
IGNORE_INDEX = -100


class TuningConfigError(TrustswarmError, ValueError):
    """Bad fine-tuning options (unknown tuning_mode, bad pre_seq_len)."""


def check_tuning_options(tuning_mode: str | None, pre_seq_len: int | None) -> int:
    """Validate the options of `from_pretrained`; return the prompt length (0: none)."""
    if tuning_mode not in TUNING_MODES:
        raise TuningConfigError(f"tuning_mode must be one of {TUNING_MODES}, got {tuning_mode!r}")
    if tuning_mode is None:
        if pre_seq_len not in (None, 0):
            raise TuningConfigError("pre_seq_len needs tuning_mode='ptune'")
        return 0
    if isinstance(pre_seq_len, bool) or not isinstance(pre_seq_len, int):
        raise TuningConfigError(
            f"tuning_mode='ptune' needs an integer pre_seq_len, got {pre_seq_len!r}"
        )
    if not 0 < pre_seq_len <= MAX_PRE_SEQ_LEN:
        raise TuningConfigError(f"pre_seq_len must be in 1..{MAX_PRE_SEQ_LEN}, got {pre_seq_len}")
    return pre_seq_len


def _shifted(positions: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of real tokens after an n-token prompt; padding keeps position 1, as
    Hugging Face derives positions from the whole mask (pads never reach real tokens)."""
    return (positions.expand(mask.shape[0], -1) + n).masked_fill(mask == 0, 1)


class SoftPrompt(nn.Module):
    """`length` trainable embeddings (float32), initialised from random token embeddings."""

    def __init__(self, length: int, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        vocab = embed_tokens.weight.shape[0]
        ids = torch.randint(0, vocab, (length,))
        self.embeddings = nn.Parameter(embed_tokens.weight.detach()[ids].float().clone())

    @property
    def length(self) -> int:
        return self.embeddings.shape[0]

    def _prompt(self, batch: int) -> torch.Tensor:
        return self.embeddings.unsqueeze(0).expand(batch, -1, -1)

    def prepend(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The forward inputs with the prompt in front (positions of real tokens shift)."""
        batch = inputs_embeds.shape[0]
        n = self.length
        embeds = torch.cat([self._prompt(batch), inputs_embeds.float()], dim=1)
        mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        prompt_positions = torch.arange(n, dtype=position_ids.dtype).expand(batch, n)
        positions = torch.cat([prompt_positions, _shifted(position_ids, attention_mask, n)], 1)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
        return embeds, mask, positions, labels

    def wrap_session(self, session: SyncInferenceSession) -> PromptedSession:
        return PromptedSession(self, session)


class PromptedSession:
    """An inference session whose prefill carries the soft prompt.

    Callers see only their own tokens: positions, masks and outputs exclude the prompt;
    the session opened underneath must have room for `prompt.length` more tokens.
    """

    def __init__(self, prompt: SoftPrompt, session: SyncInferenceSession) -> None:
        self.prompt = prompt
        self.session = session

    @property
    def length(self) -> int:
        return max(self.session.length - self.prompt.length, 0)

    def step(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        batch, n = hidden.shape[0], self.prompt.length
        first = self.session.length == 0
        positions = _shifted(positions, mask[:, -hidden.shape[1] :], n)
        mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if not first:
            return self.session.step(hidden, positions, mask)
        hidden = torch.cat([self.prompt._prompt(batch).to(hidden.dtype), hidden], dim=1)
        prompt_positions = torch.arange(n, dtype=positions.dtype).expand(batch, n)
        positions = torch.cat([prompt_positions, positions], dim=1)
        return self.session.step(hidden, positions, mask)[:, n:]

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> PromptedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
