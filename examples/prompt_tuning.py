"""Prompt tuning through a local swarm: train a soft prompt, servers' weights stay frozen.

    python examples/prompt_tuning.py                 # real SmolLM2-135M-Instruct, 15 steps
    python examples/prompt_tuning.py --tiny          # tiny random Llama: a smoke run (it learns little)
    python examples/prompt_tuning.py --steps 40 --lr 0.05 --pre-seq-len 16

Starts 3 block servers as `trustswarm node start` processes on 127.0.0.1 (as demo.py),
then a client with `tuning_mode="ptune"`: its only trainable parameters are the
`pre_seq_len` soft-prompt vectors. Every step runs the forward through the servers,
`loss.backward()` runs the backward through them (each server recomputes its blocks and
returns signed gradients w.r.t. its inputs), and a standard torch optimizer updates the
prompt. The training texts are generated here (no downloads): short sentences in one
fixed pattern, which a soft prompt can learn to announce. The loss is printed per step.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model, start_node, stop_processes

ANIMALS = ["cat", "dog", "cow", "duck", "owl", "frog", "sheep", "horse", "goat", "lion"]
SOUNDS = ["meow", "woof", "moo", "quack", "hoot", "croak", "baa", "neigh", "bleat", "roar"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "golden"]


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Sentences of one strict pattern: '<color> <animal> says <sound> twice.'"""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        i = rng.randrange(len(ANIMALS))
        color = rng.choice(COLORS)
        texts.append(f"The {color} {ANIMALS[i]} says {SOUNDS[i]} {SOUNDS[i]}.")
    return texts


class CharTokenizer:
    """For the tiny model, which has no tokenizer: one id per byte."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [3 + b % (self.vocab_size - 3) for b in text.encode()]


def batch_of(texts: list[str], encode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Right-padded ids, attention mask, and labels (-100 on padding)."""
    rows = [encode(t) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def make_tiny_model(work: Path) -> Path:
    """A random 6-block Llama, imported into a model directory (a few seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trustswarm.models.importer import import_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=6,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).eval().save_pretrained(work / "tiny-hf")
    import_model(work / "tiny-model", source=work / "tiny-hf", progress=False, name="tiny-llama")
    return work / "tiny-model"


def spans(num_blocks: int, servers: int = 3) -> list[str]:
    cuts = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:], strict=False)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (seconds)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--lr", type=float, default=None, help="Adam lr (default by model)")
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    work = Path(tempfile.mkdtemp(prefix="trustswarm-ptune-"))
    model_dir = make_tiny_model(work) if args.tiny else args.model_dir
    if not args.tiny:
        ensure_model(model_dir)
    from trustswarm.models.store import ModelDir

    num_blocks = ModelDir.open(model_dir).num_blocks
    procs: list[subprocess.Popen] = []
    try:
        addrs: list[str] = []
        for i, blocks in enumerate(spans(num_blocks)):
            proc, addr = start_node(
                model_dir, blocks, work / f"node{i}.key", addrs[:1], work / f"node{i}.log"
            )
            procs.append(proc)
            addrs.append(addr)
            print(f"server {i}: blocks {blocks:>5}  {addr}", flush=True)
        train(model_dir, addrs, args)
    finally:
        stop_processes(procs)
    return 0


def train(model_dir: Path, addrs: list[str], args: argparse.Namespace) -> None:
    from trustswarm.client import DistributedModelForCausalLM

    torch.manual_seed(args.seed)
    texts = make_texts(64, args.seed)
    with DistributedModelForCausalLM.from_pretrained(
        model_dir, addrs, tuning_mode="ptune", pre_seq_len=args.pre_seq_len
    ) as model:
        if args.tiny:
            encode = CharTokenizer(model.config.vocab_size).encode
            lr = args.lr or 0.3
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            encode = tokenizer.encode
            lr = args.lr or 0.05
        trainable = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in trainable)
        print(
            f"trainable: {count} values (soft prompt {args.pre_seq_len} x {model.config.hidden_size})"
        )
        optimizer = torch.optim.Adam(trainable, lr=lr)
        held_out = batch_of(make_texts(args.batch_size, args.seed + 1), encode)
        first = evaluate(model, held_out)
        print(f"held-out loss before: {first:.3f}", flush=True)
        rng = random.Random(args.seed)
        for step in range(1, args.steps + 1):
            ids, mask, labels = batch_of(rng.sample(texts, args.batch_size), encode)
            began = time.perf_counter()
            optimizer.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            seconds = time.perf_counter() - began
            print(f"step {step:3d}  loss {loss.item():.3f}  ({seconds:.2f} s)", flush=True)
        last = evaluate(model, held_out)
        print(f"held-out loss after:  {last:.3f}  ({'down' if last < first else 'NOT down'})")
        if not args.tiny:
            prompt = torch.tensor([encode("The")])
            out = model.generate(prompt, max_new_tokens=12, do_sample=False)
            print(f"generate with the soft prompt: {tokenizer.decode(out[0])!r}")


@torch.no_grad()
def evaluate(model, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:  # noqa: ANN001
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
