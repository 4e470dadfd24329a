"""Packaging a user can trust: the LICENSE is the one pyproject names, the declared build
requirements build the wheel, the wheel holds every subpackage and module (installed
alone into a throwaway venv, every module imports from there), every third-party module
the code imports is declared, and nothing is declared that nothing needs."""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# Top-level folders of the repository that are not part of the `trustswarm` package.
NOT_PACKAGE = {"tests", "bench", "examples", "build", "dist"}

# Import name -> distribution, where they differ and the distribution may not be installed.
NAME_MAP = {"yaml": "PyYAML", "PIL": "pillow", "google": "protobuf", "attr": "attrs"}
# Declared distributions that no module imports by name, and why they are needed.
RUNTIME_ONLY = {
    "accelerate": "transformers refuses to load a .gguf file without it (the bundled model)",
    "gguf": "transformers reads .gguf files with it (`model import` of the bundled model)",
    "numpy": "torch's Tensor.numpy() (protocol/digests.py); torch does not declare it",
    "psycopg": "SQLAlchemy's postgresql+psycopg driver (`--db postgresql+psycopg://...`)",
    "pytest-timeout": "the pytest plugin behind `timeout` in pyproject and the timeout marks",
    "ruff": "the linter `make test` runs",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.strip())
    if match is None:
        raise ValueError(f"unparsable requirement {spec!r}")
    return normalize(match.group(0))


@functools.cache
def installed_names() -> dict[str, list[str]]:
    return packages_distributions()


def distributions_of(module: str) -> set[str]:
    if module in NAME_MAP:
        return {normalize(NAME_MAP[module])}
    return {normalize(d) for d in installed_names().get(module, [module])}


def declared() -> dict[str, set[str]]:
    """Group ("dependencies" or an extra's name) -> distribution names."""
    groups = {"dependencies": {requirement_name(s) for s in PROJECT["dependencies"]}}
    for extra, specs in PROJECT["optional-dependencies"].items():
        groups[extra] = {requirement_name(s) for s in specs}
    return groups


def _skipped(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__" or name.endswith(".egg-info")


@functools.cache
def package_files() -> tuple[Path, ...]:
    """Every file of the package's source tree (what the wheel must hold)."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        top = Path(folder) == ROOT
        dirs[:] = [d for d in dirs if not _skipped(d) and not (top and d in NOT_PACKAGE)]
        found += [Path(folder) / f for f in files if not _skipped(f) and not f.endswith(".pyc")]
    return tuple(sorted(found))


def package_modules() -> list[Path]:
    return [p for p in package_files() if p.suffix == ".py"]


@functools.cache
def local_names(folder: Path) -> frozenset[str]:
    """Names a script in `folder` imports from its own folder or the repository."""
    siblings = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir()}
    return frozenset(siblings | {"trustswarm", "tests", "bench"})


def imports(path: Path) -> dict[str, bool]:
    """Third-party top-level modules `path` imports -> whether any import of it is at
    module level, unguarded (not inside a function, try, or `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__" or top in local_names(path.parent):
                continue
            found[top] = found.get(top, False) or id(node) in top_level
    return found


def imported_by(files: list[Path]) -> dict[str, dict[str, bool]]:
    """distribution -> {file: hard import?} over `files`."""
    out: dict[str, dict[str, bool]] = {}
    for path in files:
        for module, hard in imports(path).items():
            for dist in distributions_of(module):
                out.setdefault(dist, {})[str(path.relative_to(ROOT))] = hard
    return out


def scripts(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


# -- the license -------------------------------------------------------------------------


def test_license_file_is_the_declared_license() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000  # the whole text


# -- dependencies ------------------------------------------------------------------------


def test_every_import_is_declared() -> None:
    groups = declared()
    extras = set().union(*(names for group, names in groups.items() if group != "dependencies"))
    problems = []
    for dist, files in sorted(imported_by(package_modules()).items()):
        if dist in groups["dependencies"]:
            continue
        if dist not in extras:
            problems.append(f"{dist}: imported by {sorted(files)} but not declared")
        elif hard := sorted(f for f, is_hard in files.items() if is_hard):
            problems.append(f"{dist}: only an extra, but imported unguarded by {hard}")
    for folder, allowed in (("tests", {"dev"}), ("bench", {"dev", "bench"}), ("examples", set())):
        ok = groups["dependencies"].union(*(groups[g] for g in allowed))
        for dist, files in sorted(imported_by(scripts(folder)).items()):
            if dist not in ok:
                problems.append(f"{dist}: imported by {sorted(files)}, not in {sorted(allowed)}")
    assert not problems, "\n".join(problems)


def test_nothing_declared_is_unneeded() -> None:
    used = set(imported_by(package_modules() + scripts("tests") + scripts("bench")))
    used |= set(imported_by(scripts("examples")))
    unneeded = [
        f"{group}: {dist}"
        for group, names in declared().items()
        for dist in sorted(names)
        if dist not in used and dist not in RUNTIME_ONLY
    ]
    assert not unneeded, f"declared but never imported (or add a reason to RUNTIME_ONLY): {unneeded}"
    package_used = set(imported_by(package_modules()))
    for dist in declared()["dependencies"]:  # a user's install needs each one
        assert dist in package_used or dist in RUNTIME_ONLY, dist


def test_every_subpackage_is_listed() -> None:
    folders = {p.parent for p in package_modules()}
    missing_init = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())
    assert not missing_init, f"folders with modules but no __init__.py: {missing_init}"
    found = {".".join(["trustswarm", *f.relative_to(ROOT).parts]) for f in folders}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert found == listed, f"not in pyproject: {found - listed}; listed, absent: {listed - found}"


# -- the wheel ---------------------------------------------------------------------------

IMPORT_EVERY_MODULE = """
import importlib, pathlib, pkgutil, sys
import trustswarm
root = pathlib.Path(sys.argv[1]).resolve()
names = ["trustswarm"] + [m.name for m in pkgutil.walk_packages(trustswarm.__path__, "trustswarm.")]
names = [name for name in names if not name.endswith("__main__")]  # that one runs the CLI
for name in names:
    module = importlib.import_module(name)
    if not pathlib.Path(module.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"{name} imported from {module.__file__}, not the wheel")
print(len(names))
"""


def build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the sources with the declared build backend and the build
    requirements installed here (no download: the test runs offline)."""
    src = tmp_path / "src"
    for path in [*package_files(), ROOT / "pyproject.toml", ROOT / "README.md"]:
        target = src / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("trustswarm-*.whl")
    return wheel


def test_build_requirements_are_what_the_build_needs() -> None:
    system = PYPROJECT["build-system"]
    assert system["build-backend"] == "setuptools.build_meta"
    (spec,) = system["requires"]
    floor = re.fullmatch(r"setuptools>=(\d+)", spec)
    assert floor and int(floor.group(1)) >= 77  # SPDX `license = "..."` strings need 77
    installed = int(version("setuptools").split(".")[0])
    assert installed >= int(floor.group(1))  # the build below uses this one


@pytest.mark.timeout(180)
def test_wheel_holds_every_module_and_imports_alone(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read("trustswarm-0.1.0.dist-info/METADATA").decode()
        license_text = archive.read("trustswarm-0.1.0.dist-info/licenses/LICENSE")
    # The repository's own top-level files (Makefile, docs, LICENSE...) are not package
    # data; in subpackages every file is (templates, static files).
    expected = {
        "trustswarm/" + p.relative_to(ROOT).as_posix()
        for p in package_files()
        if p.parent != ROOT or p.suffix == ".py"
    }
    contents = {n for n in names if not n.startswith("trustswarm-0.1.0.dist-info/")}
    assert expected - contents == set(), "source files missing from the wheel"
    assert contents - expected == set(), "files in the wheel that are not package sources"
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert "License-Expression: Apache-2.0" in metadata
    for dist in ("multiaddr", "torch==2.13.0"):
        assert f"Requires-Dist: {dist}" in metadata
    assert 'Requires-Dist: psycopg[binary]>=3.1; extra == "postgres"' in metadata

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    # The dependencies come from this environment (a path line in a .pth file does not
    # run this environment's own .pth files, so its editable trustswarm stays out).
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run(
        [str(python), "-c", IMPORT_EVERY_MODULE, site],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == len([p for p in package_modules() if p.stem != "__main__"])
    cli = subprocess.run(
        [str(venv / "bin" / "trustswarm"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert cli.returncode == 0 and "verifier" in cli.stdout, cli.stderr[-2000:]
