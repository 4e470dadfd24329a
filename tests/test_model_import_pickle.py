"""`model import --from <HF dir>` loads safetensors only: pickle checkpoints (which can
run code when loaded) are refused with an error naming the file and saying how to
convert it, and a pickle next to safetensors weights is never opened.

A real tiny Hugging Face model is saved both ways. transformers 5 ignores
`save_pretrained(safe_serialization=False)` (it always writes safetensors), so the
legacy format it wrote before, `torch.save(state_dict)` as pytorch_model.bin, is made
here, and the test checks transformers itself still loads it (it is a real checkpoint).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trustswarm.cli import main
from trustswarm.models.errors import ModelDirError
from trustswarm.models.importer import import_model
from trustswarm.models.store import ModelDir
from trustswarm.testing.tiny_model import make_tiny_hf_dir


class TouchOnLoad:
    """A pickle whose loading creates `path`: what a hostile checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.path,)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(safetensors dir, the same model as a legacy pickle checkpoint)."""
    root = tmp_path_factory.mktemp("hf")
    safe = make_tiny_hf_dir(root / "safe", num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(safe, local_files_only=True)
    pickled = root / "pickled"
    model.save_pretrained(pickled, safe_serialization=False)
    for weights in pickled.glob("*.safetensors"):  # transformers 5 wrote these anyway
        weights.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    loaded = AutoModelForCausalLM.from_pretrained(pickled, local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values(), strict=True))  # fmt: skip
    return safe, pickled


def assert_clear(error: str, name: str) -> None:
    assert name in error and "pickle" in error and "safetensors" in error
    assert "save_pretrained" in error  # how to convert


def test_pickle_checkpoint_is_refused_and_safetensors_twin_imports(
    hf_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    safe, pickled = hf_dirs
    with pytest.raises(ModelDirError) as caught:
        import_model(tmp_path / "out", source=pickled, progress=False)
    assert_clear(str(caught.value), str(pickled / "pytorch_model.bin"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.importing-*"))
    manifest = import_model(tmp_path / "ok", source=safe, progress=False)
    assert ModelDir.open(tmp_path / "ok").manifest == manifest


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "last.ckpt", "pytorch_model.bin"])
def test_hostile_pickles_are_never_loaded(name: str, hf_dirs: tuple[Path, Path], tmp_path: Path):
    safe, _ = hf_dirs
    marker = tmp_path / "pwned"
    only_pickle = tmp_path / "only-pickle"
    shutil.copytree(safe, only_pickle)
    for weights in only_pickle.glob("*.safetensors"):
        weights.unlink()
    (only_pickle / name).write_bytes(pickle.dumps(TouchOnLoad(marker)))
    for source in (only_pickle, only_pickle / name):  # the directory, or the file itself
        with pytest.raises(ModelDirError) as caught:
            import_model(tmp_path / "out", source=source, progress=False)
        assert_clear(str(caught.value), name)
    # Beside safetensors weights, a pickle is ignored: the import reads safetensors only.
    both = tmp_path / "both"
    shutil.copytree(safe, both)
    (both / name).write_bytes(pickle.dumps(TouchOnLoad(marker)))
    import_model(tmp_path / "ok", source=both, progress=False)
    assert not marker.exists()


def test_cli_refuses_pickle_with_a_clear_message(
    hf_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, pickled = hf_dirs
    code = main(["model", "import", "--out", str(tmp_path / "m"), "--from", str(pickled), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert_clear(err, "pytorch_model.bin")
