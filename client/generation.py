"""Token generation through an inference session, following Hugging Face semantics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

if TYPE_CHECKING:
    from .model import DistributedModelForCausalLM


def _processors(config: GenerationConfig) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p not in (None, 1.0):
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


def generate(
    model: DistributedModelForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generation_config: GenerationConfig | None = None,
    streamer: object | None = None,
) -> torch.Tensor:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be [batch, tokens] with at least one token")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    config = generation_config or GenerationConfig(
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    if eos_token_id is None:
        eos_token_id = config.eos_token_id or model.config.eos_token_id
    eos = torch.tensor(
        []
        if eos_token_id is None
        else (eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]),
        dtype=torch.long,
    )
    if pad_token_id is None:
        pad_token_id = (
            config.pad_token_id
            if config.pad_token_id is not None
            else (int(eos[0]) if len(eos) else 0)
        )
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.long()
    positions = attention_mask.cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    processors = _processors(config)
    unfinished = torch.ones(batch, dtype=torch.bool)
    sequences = input_ids.clone()
    with model.inference_session(prompt_len + max_new_tokens, batch) as session:
        step_input = model.embed_tokens(input_ids)
        step_positions = positions
        for _ in range(max_new_tokens):
            hidden = session.step(step_input, step_positions, attention_mask)
            logits = model.logits_of(hidden[:, -1])
            scores = processors(sequences, logits)
            if config.do_sample:
                next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
            else:
                next_tokens = scores.argmax(dim=-1)
            next_tokens = torch.where(
                unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id)
            )
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
            if streamer is not None:
                streamer.put(next_tokens)  # type: ignore[attr-defined]
            if len(eos):
                unfinished &= ~torch.isin(next_tokens, eos)
            if not bool(unfinished.any()):
                break
            attention_mask = torch.cat([attention_mask, torch.ones(batch, 1, dtype=torch.long)], 1)
            step_positions = step_positions[:, -1:] + 1
            step_input = model.embed_tokens(next_tokens[:, None])
    if streamer is not None:
        streamer.end()  # type: ignore[attr-defined]
    return sequences
