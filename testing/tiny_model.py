"""A tiny randomly initialised Llama model, for fast tests of the real code paths."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trustswarm.models.importer import import_model


def tiny_config(num_layers: int = 6, vocab_size: int = 512, tied: bool = True) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        dtype="float32",
    )


def make_tiny_hf_dir(
    path: Path, num_layers: int = 6, seed: int = 0, vocab_size: int = 512, tied: bool = True
) -> Path:
    """Save a random tiny LlamaForCausalLM (fp32, no tokenizer) at `path`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(num_layers, vocab_size, tied)).to(torch.float32).eval()
    path = Path(path)
    model.save_pretrained(path)
    return path


def make_tiny_model_dir(tmp: Path, num_layers: int = 6, seed: int = 0) -> Path:
    """A tiny HF dir under `tmp`/hf imported into a model directory at `tmp`/model."""
    tmp = Path(tmp)
    hf = make_tiny_hf_dir(tmp / "hf", num_layers=num_layers, seed=seed)
    import_model(tmp / "model", source=hf, progress=False, name="tiny-llama")
    return tmp / "model"
