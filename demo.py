"""`make demo`: a local swarm on loopback with the bundled SmolLM2-135M-Instruct.

Starts 3 block servers as separate `trustswarm node start` processes (10 blocks
each), then a client that generates an answer to a chat prompt through them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_DIR = (
    Path(os.environ.get("TRUSTSWARM_HOME", Path.home() / ".cache" / "trustswarm"))
    / "smollm2-135m-instruct"
)


def ensure_model(model_dir: Path) -> None:
    if (model_dir / "manifest.json").is_file():
        return
    print(f"importing the bundled SmolLM2-135M-Instruct into {model_dir} (once) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "trustswarm", "model", "import", "--out", str(model_dir)], check=True
    )


def start_node(
    model_dir: Path, blocks: str, key: Path, initial: list[str], log_path: Path
) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "trustswarm",
        "node",
        "start",
        "--model",
        str(model_dir),
        "--blocks",
        blocks,
        "--identity",
        str(key),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--threads",
        "1",
    ]
    cmd += ["--initial-peers", *initial] if initial else ["--new-swarm"]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("/ip4/"):
            return proc, line.strip()
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"node for blocks {blocks} failed to start; see {log_path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--prompt", default="What is the capital of France? Answer in one sentence."
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    ensure_model(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="trustswarm-demo-"))
    procs: list[subprocess.Popen] = []
    try:
        addrs: list[str] = []
        for i, blocks in enumerate(["0:10", "10:20", "20:30"]):
            proc, addr = start_node(
                args.model_dir, blocks, work / f"node{i}.key", addrs[:1], work / f"node{i}.log"
            )
            procs.append(proc)
            addrs.append(addr)
            print(f"server {i}: blocks {blocks:>5}  {addr}", flush=True)
        run_client(args.model_dir, addrs, args.prompt, args.max_new_tokens)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


def run_client(model_dir: Path, addrs: list[str], prompt: str, max_new_tokens: int) -> None:
    import torch
    from transformers import AutoTokenizer

    from trustswarm.client import DistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with DistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=addrs) as model:
        print(f"client sees {len(model.swarm.view.servers)} servers", flush=True)
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        print(f"\nuser: {prompt}", flush=True)
        began = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - began
        new = out[0, ids.shape[1] :]
        print(f"assistant: {tokenizer.decode(new, skip_special_tokens=True).strip()}")
        print(
            f"\n{len(new)} tokens in {seconds:.2f} s = {len(new) / seconds:.1f} tokens/s through the swarm "
            f"(every answer signed and checked)"
        )
        del torch


if __name__ == "__main__":
    sys.exit(main())
