"""`trustswarm model ...` subcommands."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trustswarm.models.errors import ModelDirError


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="manage model directories")
    sub = model.add_subparsers(dest="model_command", required=True)
    imp = sub.add_parser(
        "import",
        help="convert a GGUF file or a local Hugging Face model dir into a model directory",
    )
    imp.add_argument("--out", type=Path, required=True, help="new model directory to write")
    imp.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="a .gguf file or a local HF model dir with safetensors weights; pickle checkpoints "
        "(pytorch_model.bin, *.pt, *.pth, *.ckpt) are refused (default: the bundled "
        "SmolLM2-135M-Instruct)",
    )
    imp.add_argument(
        "--name", default=None, help="human name in the model id (default: from source)"
    )
    imp.add_argument("--quiet", action="store_true", help="no progress bars")
    imp.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from trustswarm.models.importer import import_model  # torch + transformers: ~7 s

    t0 = time.perf_counter()
    try:
        manifest = import_model(
            args.out, source=args.source, progress=not args.quiet, name=args.name
        )
    except ModelDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"model id:       {manifest.model_id}")
    print(f"architecture:   {manifest.architecture}")
    print(
        f"blocks:         {manifest.num_blocks} (hidden size {manifest.hidden_size}, {manifest.dtype})"
    )
    print(f"weights digest: {manifest.span_digest(0, manifest.num_blocks)}")
    print(f"written to:     {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0
