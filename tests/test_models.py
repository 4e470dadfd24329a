"""The model directory format: manifest, importer, store, CLI.

Fixtures tiny_model_dir and real_model_dir come from tests/fixtures_models.py via conftest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trustswarm.models import cli
from trustswarm.models.errors import ModelDirError
from trustswarm.models.importer import import_model
from trustswarm.models.manifest import Manifest
from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ModelDir
from trustswarm.testing.tiny_model import make_tiny_hf_dir


@pytest.fixture
def tiny_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model dir, safe to tamper with."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _manifest_dict(model_dir: Path) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


# -- manifest ---------------------------------------------------------------------------


def test_manifest_round_trip(tiny_model_dir: Path) -> None:
    text = (tiny_model_dir / "manifest.json").read_text()
    m = Manifest.from_json(text)
    assert Manifest.from_json(m.to_json()) == m
    assert m.num_blocks == 6 and m.hidden_size == 64 and m.dtype == "float32"
    assert m.architecture == "LlamaForCausalLM"
    assert m.model_id.startswith("tiny-llama@") and len(m.model_id.split("@")[1]) == 16
    assert m.block_files[3] == "blocks/block_003.safetensors"


def _set(key, value):
    def mutate(d: dict) -> None:
        d[key] = value

    return mutate


def _drop(key):
    return lambda d: d.pop(key)


BAD_MUTATIONS = {
    "no format": _drop("format"),
    "wrong format": _set("format", "trustswarm-model-v0"),
    "missing field": _drop("client_digest"),
    "unknown field": _set("extra", 1),
    "num_blocks bool": _set("num_blocks", True),
    "num_blocks str": _set("num_blocks", "6"),
    "num_blocks mismatch": _set("num_blocks", 5),
    "hidden_size zero": _set("hidden_size", 0),
    "bad dtype": _set("dtype", "int8"),
    "digest upper": lambda d: d["block_digests"].__setitem__(0, d["block_digests"][0].upper()),
    "digest short": lambda d: d["block_digests"].__setitem__(0, "ab" * 16),
    "block_files not list": _set("block_files", "blocks"),
    "path traversal": lambda d: d["block_files"].__setitem__(0, "../evil.safetensors"),
    "absolute path": _set("client_file", "/etc/passwd"),
    "duplicate file": lambda d: d["block_files"].__setitem__(1, d["block_files"][0]),
    "id without hash": _set("model_id", "tiny-llama"),
    "id wrong hash": _set("model_id", "tiny-llama@0123456789abcdef"),
    "digest swapped": lambda d: d["block_digests"].__setitem__(0, d["block_digests"][1]),
    "architecture not identifier": _set("architecture", "Llama For CausalLM"),
}


@pytest.mark.parametrize("mutation", BAD_MUTATIONS.values(), ids=BAD_MUTATIONS.keys())
def test_manifest_rejects_malformed_fields(tiny_model_dir: Path, mutation) -> None:
    data = _manifest_dict(tiny_model_dir)
    mutation(data)
    with pytest.raises(ModelDirError):
        Manifest.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"', b"\xff\xfe"])
def test_manifest_rejects_malformed_json(text) -> None:
    with pytest.raises(ModelDirError):
        Manifest.from_json(text)


def test_span_digest(tiny_model_dir: Path, tmp_path: Path) -> None:
    m = ModelDir.open(tiny_model_dir).manifest
    digests = {m.span_digest(s, e) for s, e in [(0, 2), (2, 4), (0, 4), (0, 6), (1, 2)]}
    assert len(digests) == 5
    assert m.span_digest(0, 2) == m.span_digest(0, 2)
    for bad in [(2, 2), (-1, 2), (0, 7), (4, 3)]:
        with pytest.raises(ModelDirError):
            m.span_digest(*bad)
    # Different weights: same shapes, different seed.
    hf = make_tiny_hf_dir(tmp_path / "hf1", seed=1)
    other = import_model(tmp_path / "model1", source=hf, progress=False, name="tiny-llama")
    assert other.span_digest(0, 2) != m.span_digest(0, 2)
    assert other.model_id != m.model_id


def test_import_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = import_model(tmp_path / "again", source=tiny_model_dir.parent / "hf", progress=False)
    first = ModelDir.open(tiny_model_dir).manifest
    assert again.block_digests == first.block_digests
    assert again.client_digest == first.client_digest
    # Default name comes from the source folder; the weight fingerprint is the same.
    assert again.model_id == "hf@" + first.model_id.split("@")[1]


# -- importer ---------------------------------------------------------------------------


def test_import_layout(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "client.safetensors", "manifest.json", "blocks"} <= names
    assert len(list((tiny_model_dir / "blocks").iterdir())) == 6
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    # No stray temporary directories next to the output.
    assert sorted(p.name for p in tiny_model_dir.parent.iterdir()) == ["hf", "model"]


def test_import_refuses_non_empty_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "file").write_text("x")
    with pytest.raises(ModelDirError, match="not an empty directory"):
        import_model(out, source=tiny_model_dir.parent / "hf", progress=False)


def test_failed_import_leaves_nothing(tmp_path: Path) -> None:
    bogus = tmp_path / "empty"
    bogus.mkdir()
    with pytest.raises(ModelDirError):
        import_model(tmp_path / "out", source=bogus, progress=False)
    with pytest.raises(ModelDirError):
        import_model(tmp_path / "out", source=tmp_path / "missing.bin", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_import_untied_head(tmp_path: Path) -> None:
    hf = make_tiny_hf_dir(tmp_path / "hf", num_layers=2, tied=False)
    import_model(tmp_path / "model", source=hf, progress=False)
    parts = ModelDir.open(tmp_path / "model").load_client_parts()
    ref = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True)
    assert parts.lm_head.weight.data_ptr() != parts.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(parts.lm_head.weight, ref.lm_head.weight, rtol=0, atol=0)


# -- store ------------------------------------------------------------------------------


def test_open_and_load(tiny_model_dir: Path) -> None:
    md = ModelDir.open(tiny_model_dir)
    assert md.num_blocks == 6 and md.tokenizer_path is None
    blocks = md.load_blocks(2, 4)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2
    assert [b.self_attn.layer_idx for b in blocks] == [2, 3]
    assert all(not p.requires_grad for b in blocks for p in b.parameters())
    assert not any(b.training for b in blocks)
    bf16 = md.load_blocks(0, 1, dtype=torch.bfloat16)[0]
    assert bf16.mlp.up_proj.weight.dtype == torch.bfloat16
    parts = md.load_client_parts()
    assert parts.lm_head.weight is parts.embed_tokens.weight  # tied
    assert type(parts.norm).__name__ == "LlamaRMSNorm"
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir.parent / "hf", local_files_only=True)
    torch.testing.assert_close(
        blocks[1].self_attn.q_proj.weight,
        ref.model.layers[3].self_attn.q_proj.weight,
        rtol=0,
        atol=0,
    )


def test_loads_only_requested_blocks(tiny_copy: Path) -> None:
    for i in (0, 1, 4, 5):
        (tiny_copy / f"blocks/block_{i:03d}.safetensors").unlink()
    md = ModelDir.open(tiny_copy)
    assert len(md.load_blocks(2, 4)) == 2
    with pytest.raises(ModelDirError, match="cannot read"):
        md.load_blocks(4, 6)


def test_tampered_block_rejected(tiny_copy: Path) -> None:
    path = tiny_copy / "blocks/block_001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit in the tensor data
    path.write_bytes(bytes(data))
    md = ModelDir.open(tiny_copy)
    md.load_blocks(0, 1)
    with pytest.raises(ModelDirError, match="sha256"):
        md.load_blocks(0, 2)
    assert len(md.load_blocks(0, 2, verify=False)) == 2


def test_tampered_client_rejected(tiny_copy: Path) -> None:
    path = tiny_copy / "client.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="sha256"):
        ModelDir.open(tiny_copy).load_client_parts()


def test_open_rejects_broken_dirs(tiny_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="not a model directory"):
        ModelDir.open(tmp_path / "nowhere")
    config = json.loads((tiny_copy / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="does not match"):
        ModelDir.open(tiny_copy)
    (tiny_copy / "config.json").unlink()
    with pytest.raises(ModelDirError, match="config"):
        ModelDir.open(tiny_copy)
    (tiny_copy / "manifest.json").write_text("{}")
    with pytest.raises(ModelDirError):
        ModelDir.open(tiny_copy)


# -- cli --------------------------------------------------------------------------------


def test_cli_import(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli-model"
    args = parser.parse_args(
        [
            "model",
            "import",
            "--out",
            str(out),
            "--from",
            str(tiny_model_dir.parent / "hf"),
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert ModelDir.open(out).manifest.model_id in text and "blocks:         6" in text
    args = parser.parse_args(["model", "import", "--out", str(out), "--quiet"])
    assert args.func(args) == 1  # out is not empty


# -- the real model ---------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_reassembles_gguf_logits(real_model_dir: Path, real_hf_model) -> None:
    md = ModelDir.open(real_model_dir)
    assert md.num_blocks == 30 and md.tokenizer_path == real_model_dir
    assert md.manifest.model_id.startswith("SmolLM2-135M-Instruct@")
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    input_ids = ids["input_ids"]
    assert input_ids.shape[1] > 5

    t0 = time.perf_counter()
    md.load_blocks(10, 20)
    print(f"\nload_blocks(10, 20): {time.perf_counter() - t0:.3f} s")

    parts = md.load_client_parts()
    h = parts.embed_tokens(input_ids)
    with torch.inference_mode():
        for start in (0, 10, 20):
            h = BlockRunner(md, start, start + 10).forward(h)
        logits = parts.lm_head(parts.norm(h))

    with torch.inference_mode():
        ref = real_hf_model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)
    assert tok.decode(logits[0, -1].argmax()) == tok.decode(ref[0, -1].argmax())

