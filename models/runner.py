"""The block runner: a span of decoder layers run with transformers' own modules and masks.

Torch only (no networking): servers call it to answer requests, verifiers to recompute
reference answers. All inputs are validated here and rejected with RunnerError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask

from trustswarm.models.residual import ScaleRecorder, recording, token_peak
from trustswarm.models.store import ModelDir


class RunnerError(ValueError):
    """A request the runner cannot serve: bad shapes, exhausted cache, unsupported model."""


@dataclass(eq=False)
class InferenceCache:
    """KV cache of one inference session over one span. Not thread-safe: one step at a time."""

    span: tuple[int, int]
    batch_size: int
    max_length: int
    kv: Cache
    length: int = 0
    # Set when a step failed part-way: some layers may hold the new tokens, others not.
    broken: bool = False


class BlockRunner:
    def __init__(
        self, model_dir: ModelDir, start: int, end: int, dtype: torch.dtype = torch.float32
    ) -> None:
        if not (0 <= start < end <= model_dir.num_blocks):
            raise RunnerError(f"bad span [{start}, {end}) for {model_dir.num_blocks} blocks")
        if not dtype.is_floating_point:
            raise RunnerError(f"dtype must be floating point, got {dtype}")
        config = model_dir.config.get_text_config()
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None:  # older configs: a sliding_window alone means sliding layers
            layer_types = [
                "sliding" if getattr(config, "sliding_window", None) else "full_attention"
            ]
            layer_types *= model_dir.num_blocks
        # Only full causal attention is masked here; sliding/linear layers need other masks.
        if any(t != "full_attention" for t in layer_types[start:end]):
            raise RunnerError("only models with full causal attention layers are supported")
        self.model_dir = model_dir
        self.config = model_dir.config
        self.start, self.end, self.dtype = start, end, dtype
        self.hidden_size = model_dir.manifest.hidden_size
        self.weights_digest = model_dir.manifest.span_digest(start, end)
        self.blocks = model_dir.load_blocks(start, end, dtype=dtype)
        self.rotary = model_dir.load_rotary()

    # -- validation ---------------------------------------------------------------------

    def _hidden(self, hidden_states: torch.Tensor, what: str = "hidden_states") -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3:
            raise RunnerError(f"{what} must be a 3-D tensor [batch, tokens, hidden]")
        b, t, h = hidden_states.shape
        if h != self.hidden_size:
            raise RunnerError(f"{what} hidden size is {h}, this model has {self.hidden_size}")
        if b == 0 or t == 0:
            raise RunnerError(f"{what} is empty: shape {tuple(hidden_states.shape)}")
        if not hidden_states.dtype.is_floating_point:
            raise RunnerError(f"{what} must be floating point, got {hidden_states.dtype}")
        return hidden_states.to(self.dtype)

    @staticmethod
    def _positions(position_ids: torch.Tensor | None, b: int, t: int, offset: int) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(offset, offset + t).unsqueeze(0).expand(b, t)
        if (
            position_ids.ndim != 2
            or position_ids.shape[1] != t
            or position_ids.shape[0] not in (1, b)
        ):
            raise RunnerError(f"position_ids must be [{b}, {t}], got {tuple(position_ids.shape)}")
        if position_ids.dtype not in (torch.int32, torch.int64) or bool((position_ids < 0).any()):
            raise RunnerError("position_ids must be non-negative integers")
        return position_ids.to(torch.int64).expand(b, t)

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None, b: int, length: int) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if tuple(attention_mask.shape) != (b, length):
            raise RunnerError(
                f"attention_mask must be [{b}, {length}], got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.is_complex():
            raise RunnerError("attention_mask must be integer or bool (1 = token, 0 = padding)")
        return attention_mask

    def _span(self, start: int | None, end: int | None) -> tuple[int, int]:
        """A sub-span of the served blocks (default: all of them)."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise RunnerError(
                f"blocks {start}:{end} are not within the served span {self.start}:{self.end}"
            )
        return start, end

    # -- compute ------------------------------------------------------------------------

    def _run(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv: Cache | None,
        span: tuple[int, int],
    ) -> torch.Tensor:
        start, end = span
        # layer_idx=start: the cache is indexed by global layer, layers < start stay empty.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=h,
            attention_mask=attention_mask,
            past_key_values=kv,
            position_ids=position_ids,
            layer_idx=start,
        )
        position_embeddings = self.rotary(h, position_ids)
        for block in self.blocks[start - self.start : end - self.start]:
            out = block(
                h,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=kv,
                use_cache=kv is not None,
                position_embeddings=position_embeddings,
            )
            h = out[0] if isinstance(out, tuple) else out
        return h

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Stateless pass through the span (or the sub-span start:end). Returns [B, T, H] in self.dtype.
        attention_mask is the HF 2-D padding mask [B, T] (1 = token, 0 = pad)."""
        h = self._hidden(hidden_states)
        b, t, _ = h.shape
        pos = self._positions(position_ids, b, t, 0)
        mask = self._mask(attention_mask, b, t)
        span = self._span(start, end)
        with torch.inference_mode():
            return self._run(h, pos, mask, None, span)

    def new_cache(
        self, batch_size: int, max_length: int, start: int | None = None, end: int | None = None
    ) -> InferenceCache:
        span = self._span(start, end)
        if batch_size <= 0 or max_length <= 0:
            raise RunnerError("batch_size and max_length must be positive")
        return InferenceCache(
            span=span,
            batch_size=batch_size,
            max_length=max_length,
            kv=DynamicCache(config=self.config),
        )

    def check_step(
        self,
        cache: InferenceCache,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """step()'s validation alone (RunnerError): the hidden states in self.dtype, the
        positions [B, T_new] and the mask. models/batched_step.py checks each step with it."""
        self._span(*cache.span)
        if cache.broken:
            raise RunnerError("cache is unusable after a failed step; start a new session")
        h = self._hidden(hidden_states)
        b, t, _ = h.shape
        if b != cache.batch_size:
            raise RunnerError(f"batch size {b} does not match the session's {cache.batch_size}")
        if cache.length + t > cache.max_length:
            raise RunnerError(
                f"{cache.length} + {t} tokens exceed the session's max_length {cache.max_length}"
            )
        pos = self._positions(position_ids, b, t, cache.length)
        return h, pos, self._mask(attention_mask, b, cache.length + t)

    def step(
        self,
        cache: InferenceCache,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run T_new tokens (prefill, replay or one decode step) and append them to the cache.
        attention_mask covers past + new tokens: [B, cache.length + T_new]."""
        h, pos, mask = self.check_step(cache, hidden_states, position_ids, attention_mask)
        try:
            with torch.inference_mode():
                out = self._run(h, pos, mask, cache.kv, cache.span)
        except BaseException:
            cache.broken = True
            raise
        cache.length += h.shape[1]
        return out

    def backward(
        self,
        hidden_states: torch.Tensor,
        grad_outputs: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Gradient of <forward(hidden_states), grad_outputs> w.r.t. hidden_states, in self.dtype.
        Recomputes the forward; the weights never require grad and never change."""
        h = self._hidden(hidden_states)
        g = self._hidden(grad_outputs, "grad_outputs")
        if g.shape != h.shape:
            raise RunnerError(f"grad_outputs shape {tuple(g.shape)} != {tuple(h.shape)}")
        b, t, _ = h.shape
        pos = self._positions(position_ids, b, t, 0)
        mask = self._mask(attention_mask, b, t)
        span = self._span(start, end)
        with torch.inference_mode(False), torch.enable_grad():
            # clone() turns a possible inference tensor into one autograd accepts.
            x = h.clone().requires_grad_(True)
            out = self._run(x, pos, mask, None, span)
            (grad,) = torch.autograd.grad(out, x, g.clone())
        return grad.detach()

    # -- with the residual scale (verifiers: the scale a proof is measured against) -------

    def _blocks_of(self, span: tuple[int, int]) -> list:
        return self.blocks[span[0] - self.start : span[1] - self.start]

    def forward_with_scale(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward() and, per token, max|input| + the peak of every residual term the span
        adds (models/residual.py); None for architectures without recognisable terms."""
        span = self._span(start, end)
        with recording(self._blocks_of(span), backward=False) as recorder:
            out = self.forward(hidden_states, position_ids, attention_mask, *span)
        return out, _scale(recorder, hidden_states)

    def step_with_scale(
        self,
        cache: InferenceCache,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """step() and the residual scale of the new tokens."""
        with recording(self._blocks_of(self._span(*cache.span)), backward=False) as recorder:
            out = self.step(cache, hidden_states, position_ids, attention_mask)
        return out, _scale(recorder, hidden_states)

    def backward_with_scale(
        self,
        hidden_states: torch.Tensor,
        grad_outputs: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """backward() and, per token, max|grad_outputs| + the peak of every branch's
        contribution to the input gradient."""
        span = self._span(start, end)
        with recording(self._blocks_of(span), backward=True) as recorder:
            out = self.backward(hidden_states, grad_outputs, position_ids, attention_mask, *span)
        return out, _scale(recorder, grad_outputs)


def _scale(recorder: ScaleRecorder | None, first_term: torch.Tensor) -> torch.Tensor | None:
    if recorder is None or recorder.total is None:
        return None
    return recorder.total + token_peak(first_term)
