"""transformers' `generate` with the swarm's inference session behind the cache.

`DistributedModelForCausalLM` is a `GenerationMixin` model: every decoding strategy,
logits processor, stopping criterion and streamer of transformers runs unchanged on the
client. The KV cache is the servers'; `SwarmCache` is what `generate` holds in its place.
It opens an inference session at the first forward (batch = the rows `generate` runs,
beams and `num_return_sequences` included), sends each step's new tokens through it,
and remembers every row's inputs (embeddings and positions) so that it can rebuild the
servers' caches.

Beam search reorders the cache after every step. Servers have no reorder operation, so
when the reorder is not the identity `SwarmCache` closes its session, reorders its own
record of the rows, and at the next forward opens a fresh session and replays every
selected row's whole prefix (prompt + generated tokens) in one step. Cost: with
`num_beams > 1`, nearly every step opens a new session on every hop (one round trip per
hop) and recomputes the prefix, so n new tokens cost O(n * (prompt + n)) token-blocks of
server compute instead of O(prompt + n). Greedy decoding and sampling never reorder.
The same replay serves a session too short for what `generate` asks (it reopens larger).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.cache_utils import Cache

from trustswarm.protocol.errors import TrustswarmError

from .history import GrowingHistory


class GenerationArgumentError(TrustswarmError, ValueError):
    """An argument `generate` cannot honour with a swarm-backed cache."""


class StepSession(Protocol):
    @property
    def length(self) -> int: ...

    def step(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor: ...

    def close(self) -> None: ...


OpenSession = Callable[[int, int], StepSession]  # (max_length, batch_size) -> session


@dataclass(eq=False)
class SwarmCache(Cache):
    """Stands for the servers' KV caches in `generate` (see the module docstring).

    `max_length` sizes the session (prompt + new tokens); `close()` ends it (the
    model's `generate` always does). `replays` counts sessions reopened to replay."""

    open_session: OpenSession
    max_length: int
    session: StepSession | None = None
    inputs: torch.Tensor | None = None  # [rows, seen, hidden]: everything fed so far
    positions: torch.Tensor | None = None  # [rows, seen]
    replays: int = 0
    sessions_opened: int = 0
    session_max: int = 0  # max_length of the open session
    _is_user_defined: bool = field(default=True, repr=False)
    # Backing stores of inputs / positions (views into them) with room for more steps.
    _inputs: GrowingHistory = field(default_factory=GrowingHistory, repr=False)
    _positions: GrowingHistory = field(default_factory=GrowingHistory, repr=False)

    def __post_init__(self) -> None:
        Cache.__init__(self, layers=[])

    # -- what generate asks of a Cache -------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.inputs is None else self.inputs.shape[1]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise GenerationArgumentError("the swarm's KV cache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise GenerationArgumentError("the swarm's KV cache cannot be expanded in place")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise GenerationArgumentError("the swarm's KV cache cannot be sliced in place")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows i of the next step continue rows beam_idx[i]: a fresh session will be
        replayed at the next forward (unless beam_idx is the identity)."""
        if self.inputs is None:
            return
        idx = beam_idx.to(torch.long).cpu()
        if torch.equal(idx, torch.arange(self.inputs.shape[0])):
            return
        self.inputs = self.inputs[idx]
        self.positions = self.positions[idx]
        self._end_session()  # the servers' caches no longer match the rows

    def reset(self) -> None:
        self.close()
        self.inputs = self.positions = None

    # -- running steps -----------------------------------------------------------------

    def step(
        self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Run new tokens (embeddings [rows, new, hidden], positions [rows, new]; mask
        [rows, seen + new]) through the blocks; returns their hidden states."""
        rows, new = embeds.shape[:2]
        positions = positions.expand(rows, -1).long()
        seen = self.get_seq_length()
        if self.inputs is not None and self.inputs.shape[0] != rows:
            raise GenerationArgumentError(
                f"cache holds {self.inputs.shape[0]} rows, the step has {rows}"
            )
        if self.session is not None and seen + new > self.session_max:
            self._end_session()  # too short for this step: reopen larger and replay
        if self.session is None:
            self.session_max = max(self.max_length, seen + new)
            self.session = self.open_session(self.session_max, rows)
            self.sessions_opened += 1
            if seen:
                self.replays += 1
                embeds_all = torch.cat([self.inputs, embeds.float()], dim=1)
                positions_all = torch.cat([self.positions, positions], dim=1)
                hidden = self.session.step(embeds_all, positions_all, mask)[:, seen:]
                self._remember(embeds, positions)
                return hidden
        hidden = self.session.step(embeds, positions, mask)
        self._remember(embeds, positions)
        return hidden

    def _remember(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        """Append a step's rows to the history (client/history.py: a decode step writes its
        own token, not a copy of the whole history)."""
        hint = self.max_length
        self.inputs = self._inputs.append_to(self.inputs, embeds.detach().float(), hint)
        self.positions = self._positions.append_to(self.positions, positions.long(), hint)

    def _end_session(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()

    def close(self) -> None:
        """End the servers' sessions (idempotent)."""
        self._end_session()


# Options of GenerationMixin.generate that need a cache we cannot give.
_UNSUPPORTED = {
    "assistant_model": "assisted generation rewinds the KV cache, which the servers cannot do",
    "prompt_lookup_num_tokens": "prompt lookup decoding rewinds the KV cache",
    "assistant_early_exit": "assisted generation rewinds the KV cache",
    "cache_implementation": "the KV cache lives on the servers (no cache_implementation)",
    "past_key_values": "the KV cache lives on the servers; generate makes its own SwarmCache",
}


def check_generate_kwargs(kwargs: dict[str, Any]) -> None:
    for name, why in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise GenerationArgumentError(f"generate({name}=...) is not supported: {why}")
    if kwargs.get("use_cache") is False:
        raise GenerationArgumentError(
            "generate(use_cache=False) is not supported: every step runs through an inference "
            "session (use model(input_ids) for a plain forward)"
        )
    if kwargs.get("custom_generate") is not None:
        raise GenerationArgumentError("generate(custom_generate=...) is not supported")


def planned_length(base: GenerationConfig, kwargs: dict[str, Any], prompt_len: int) -> int:
    """Prompt + new tokens as `generate` will size them: the session's max_length
    (GenerationConfig semantics; if generate needs more, the cache reopens and replays)."""
    new = kwargs.get("max_new_tokens", base.max_new_tokens)
    if new is not None:
        return prompt_len + int(new)
    length = kwargs.get("max_length", base.max_length)
    if length is not None:
        return max(int(length), prompt_len + 1)
    return prompt_len + int(GenerationConfig().max_length or 20)


def _no_eos_padding(kwargs: dict[str, Any], base: GenerationConfig) -> None:
    """eos_token_id=[] means "never stop at EOS" (as the hand-written generate took it);
    transformers then needs a pad token it would otherwise take from EOS."""
    eos = kwargs.get("eos_token_id")
    if isinstance(eos, list | tuple) and not eos and kwargs.get("pad_token_id") is None:
        kwargs["pad_token_id"] = base.pad_token_id if base.pad_token_id is not None else 0


def load_generation_config(model_dir: Path, config: PretrainedConfig) -> GenerationConfig:
    """The model directory's generation_config.json (read locally), else the config's."""
    if (model_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    return GenerationConfig.from_model_config(config)


class SwarmGenerationMixin(GenerationMixin):
    """transformers' `GenerationMixin` on a model whose blocks run in the swarm.

    The host class provides `config`, `generation_config`, `forward` (which steps a
    `SwarmCache` given as `past_key_values`) and `inference_session`."""

    main_input_name = "input_ids"
    base_model_prefix = ""
    # The servers' caches cannot be rewound: transformers then refuses assisted decoding.
    _is_stateful = True
    input_modalities = ("text",)
    output_modalities = ("text",)

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def is_remote_code(cls) -> bool:
        return False

    def get_experts_implementation(self) -> dict[str, str]:
        return {}  # no mixture-of-experts layers run on the client

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def generate(  # noqa: D417 - transformers documents the arguments
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' `GenerationMixin.generate` (every argument it takes for a causal
        LM), run through one inference session that this call opens and always closes.

        Not supported (clear error): `use_cache=False`, `past_key_values`,
        `cache_implementation`, assisted / prompt-lookup decoding, `custom_generate`.
        With `num_beams > 1` every step whose beam reorder is not the identity reopens
        the session and replays the selected rows' prefixes (O(n * (prompt + n)) server
        compute for n new tokens, a session open per hop per step); see
        `trustswarm.client.generation`."""
        check_generate_kwargs(kwargs)
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise GenerationArgumentError(
                f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}"
            )
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        if prompt is not None and (not isinstance(prompt, torch.Tensor) or prompt.dim() < 2):
            raise GenerationArgumentError("inputs must be a [batch, tokens] tensor of token ids")
        prompt_len = prompt.shape[1] if prompt is not None else 1
        if prompt is not None and prompt_len == 0:
            raise GenerationArgumentError("inputs must hold at least one token")
        base = generation_config or self.generation_config
        _no_eos_padding(kwargs, base)
        cache = SwarmCache(self.inference_session, planned_length(base, kwargs, prompt_len))
        try:
            return super().generate(
                inputs, generation_config=generation_config, past_key_values=cache, **kwargs
            )
        finally:
            cache.close()
