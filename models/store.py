"""Open a model directory and build blocks / client parts from it, loading only what is asked."""

from __future__ import annotations

import copy
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from trustswarm.models.errors import ModelDirError
from trustswarm.models.importer import MANIFEST_FILE
from trustswarm.models.manifest import Manifest

# Building the meta skeleton runs the model's __init__; cache it per config.
_SKELETONS: dict[str, PreTrainedModel] = {}
_SKELETON_LOCK = threading.Lock()


def _skeleton(config: PretrainedConfig) -> PreTrainedModel:
    key = config.to_json_string(use_diff=False)
    with _SKELETON_LOCK:
        skel = _SKELETONS.get(key)
        if skel is None:
            try:
                with torch.device("meta"):
                    skel = AutoModelForCausalLM.from_config(copy.deepcopy(config))
            except (ValueError, KeyError, TypeError) as e:
                raise ModelDirError(f"cannot build model {config.model_type!r}: {e}") from e
            _SKELETONS[key] = skel
        return skel


def _materialise(meta_module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Give a meta-device module the tensors in `state` (exact key match)."""
    module = copy.deepcopy(meta_module)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelDirError(f"{what}: weights do not fit the architecture: {e}") from e
    # Non-persistent buffers are computed in __init__, not stored; meta means we lack them.
    leftover = [n for n, t in module.named_buffers() if t.is_meta]
    if leftover:
        raise ModelDirError(f"{what}: buffers {leftover} cannot be restored from a meta skeleton")
    return module


def _freeze(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    module = module.to(dtype).eval()
    module.requires_grad_(False)
    return module


@dataclass
class ClientParts:
    """What a client keeps locally: embeddings, final norm and LM head."""

    embed_tokens: nn.Embedding
    norm: nn.Module
    lm_head: nn.Linear


class ModelDir:
    """A verified-on-load model directory written by `import_model`."""

    def __init__(self, path: Path, manifest: Manifest, config: PretrainedConfig) -> None:
        self.path = path
        self.manifest = manifest
        self.config = config

    @classmethod
    def open(cls, path: Path | str, attn_implementation: str = "sdpa") -> ModelDir:
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ModelDirError(f"{path} is not a model directory (no {MANIFEST_FILE})")
        manifest = Manifest.from_json(manifest_path.read_bytes())
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelDirError(f"{path}: bad config.json: {e}") from e
        # Unset, the mask helpers return no mask at all: choose explicitly.
        config._attn_implementation = attn_implementation
        text = config.get_text_config()
        if (
            text.num_hidden_layers != manifest.num_blocks
            or text.hidden_size != manifest.hidden_size
        ):
            raise ModelDirError(f"{path}: config.json does not match manifest.json")
        if manifest.architecture not in (config.architectures or []):
            raise ModelDirError(
                f"{path}: config architectures do not include {manifest.architecture}"
            )
        return cls(path, manifest, config)

    @property
    def num_blocks(self) -> int:
        return self.manifest.num_blocks

    @property
    def tokenizer_path(self) -> Path | None:
        has = any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return self.path if has else None

    def _read(self, rel: str, digest: str, verify: bool) -> dict[str, torch.Tensor]:
        file = self.path / rel
        try:
            data = file.read_bytes()
        except OSError as e:
            raise ModelDirError(f"cannot read {file}: {e}") from e
        if verify and hashlib.sha256(data).hexdigest() != digest:
            raise ModelDirError(f"{file}: sha256 does not match the manifest (tampered or corrupt)")
        try:
            return load_safetensors(data)
        except (SafetensorError, ValueError) as e:
            raise ModelDirError(f"{file}: not a valid safetensors file: {e}") from e

    def load_blocks(
        self, start: int, end: int, dtype: torch.dtype = torch.float32, verify: bool = True
    ) -> list[nn.Module]:
        """Decoder layers [start, end) as the architecture's own modules, frozen, in eval mode.
        Each keeps its global layer_idx (KV caches index by it)."""
        if not (0 <= start < end <= self.num_blocks):
            raise ModelDirError(f"bad block span [{start}, {end}) for {self.num_blocks} blocks")
        layer_cls = type(_skeleton(self.config).model.layers[0])
        blocks = []
        for i in range(start, end):
            state = self._read(self.manifest.block_files[i], self.manifest.block_digests[i], verify)
            with torch.device("meta"):
                meta = layer_cls(self.config, layer_idx=i)
            blocks.append(_freeze(_materialise(meta, state, f"block {i}"), dtype))
        return blocks

    def load_rotary(self) -> nn.Module:
        """The architecture's rotary embedding. Its tables stay float32 (as in HF models);
        it returns cos/sin in the dtype of the hidden states it is given."""
        rotary = type(_skeleton(self.config).model.rotary_emb)(config=self.config)
        return rotary.eval()

    def load_client_parts(
        self, dtype: torch.dtype = torch.float32, verify: bool = True
    ) -> ClientParts:
        skel = _skeleton(self.config)
        state = self._read(self.manifest.client_file, self.manifest.client_digest, verify)
        tied = bool(getattr(self.config.get_text_config(), "tie_word_embeddings", False))

        def part(prefix: str, meta: nn.Module) -> nn.Module:
            sub = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            return _freeze(_materialise(meta, sub, f"client {prefix.rstrip('.')}"), dtype)

        known = ("embed_tokens.", "norm.", "lm_head.")
        unknown = [k for k in state if not k.startswith(known)]
        if unknown or tied == any(k.startswith("lm_head.") for k in state):
            raise ModelDirError(f"{self.manifest.client_file}: unexpected keys for tied={tied}")
        embed = part("embed_tokens.", skel.get_input_embeddings())
        norm = part("norm.", skel.model.norm)
        if tied:
            head = copy.deepcopy(skel.get_output_embeddings())
            if head.bias is not None:
                raise ModelDirError("tied embeddings with a head bias are not supported")
            head.weight = embed.weight  # tied: one tensor, as in the HF model
            head.eval()
        else:
            head = part("lm_head.", skel.get_output_embeddings())
        return ClientParts(embed_tokens=embed, norm=norm, lm_head=head)
