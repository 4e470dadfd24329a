"""Session fixtures for model directories: a tiny random Llama, and the real SmolLM2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trustswarm.models.importer import import_model
from trustswarm.testing.tiny_model import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-block tiny model directory; its source HF dir is the sibling `hf`."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF imported into a model directory (~25 s)."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    t0 = time.perf_counter()
    import_model(out, progress=False)
    print(f"\n[real_model_dir] import took {time.perf_counter() - t0:.1f} s")
    return out


@pytest.fixture(scope="session")
def real_hf_model(real_model_dir: Path):
    """The bundled GGUF loaded by Hugging Face itself: the local reference (~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    from trustswarm.models.importer import bundled_gguf

    gguf = bundled_gguf()
    return AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
