"""Validation of the tensors in a request, with clear reasons for the peer."""

from __future__ import annotations

import torch

from trustswarm.protocol.codec import Message
from trustswarm.protocol.errors import LimitExceededError, ProtocolError

from .config import ServerConfig


def validate_span(message: Message, served_start: int, served_end: int) -> tuple[int, int]:
    start = message.int_field("start")
    end = message.int_field("end")
    if not served_start <= start < end <= served_end:
        raise ProtocolError(
            f"blocks {start}:{end} are not within the served span {served_start}:{served_end}"
        )
    return start, end


def hidden_states_of(message: Message, hidden_size: int, config: ServerConfig) -> torch.Tensor:
    hidden = message.tensor("hidden_states")
    if hidden.dim() != 3 or hidden.shape[-1] != hidden_size:
        raise ProtocolError(
            f"hidden_states must be [batch, tokens, {hidden_size}], got {list(hidden.shape)}"
        )
    if not hidden.is_floating_point():
        raise ProtocolError("hidden_states must be a floating point tensor")
    batch, tokens = hidden.shape[0], hidden.shape[1]
    if batch == 0 or tokens == 0:
        raise ProtocolError("hidden_states is empty")
    if batch > config.max_batch:
        raise LimitExceededError(f"batch {batch} exceeds this server's max {config.max_batch}")
    if batch * tokens > config.max_tokens_per_request:
        raise LimitExceededError(
            f"{batch * tokens} tokens exceed this server's max {config.max_tokens_per_request}"
        )
    return hidden


def positions_of(message: Message, batch: int, tokens: int) -> torch.Tensor | None:
    positions = message.optional_tensor("position_ids")
    if positions is None:
        return None
    if positions.dtype not in (torch.int64, torch.int32) or list(positions.shape) != [
        batch,
        tokens,
    ]:
        raise ProtocolError(f"position_ids must be integer [{batch}, {tokens}]")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= 1 << 20):
        raise ProtocolError("position_ids out of range")
    return positions.long()


def attention_mask_of(message: Message, batch: int, total_tokens: int) -> torch.Tensor | None:
    mask = message.optional_tensor("attention_mask")
    if mask is None:
        return None
    if list(mask.shape) != [batch, total_tokens] or mask.is_floating_point():
        raise ProtocolError(f"attention_mask must be integer or bool [{batch}, {total_tokens}]")
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 1):
        raise ProtocolError("attention_mask must hold only 0 and 1")
    return mask.long()
