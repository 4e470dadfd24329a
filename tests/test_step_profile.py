"""The step profile behind `bench/generation.py --profile` (trustswarm.testing.step_profile)
on real processes: two tiny-model servers run under its wrapper, a client process
generates under its patches, and every category the report prints must have been
recorded, per decode step and per block, so a refactor that moves a timed function
shows up here instead of as zeros in a profile."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trustswarm.testing.step_profile import DECODE, PREFILL, Tally

pytestmark = pytest.mark.timeout(180)
SPANS = ("0:4", "4:6")
NEW_TOKENS = 5  # a prefill and 4 decode steps

CLIENT = textwrap.dedent(
    """
    import json, sys
    import torch
    from trustswarm.testing.step_profile import ClientProfile, MISSING

    profile = ClientProfile(enabled=True)
    profile.install()
    from trustswarm.client import DistributedModelForCausalLM

    model = DistributedModelForCausalLM.from_pretrained(sys.argv[1], sys.argv[2:])
    profile.hook(model)
    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    try:
        out = model.generate(ids, max_new_tokens={n}, do_sample=False, eos_token_id=[])
    finally:
        profile.run_ended()
        model.close()
    print(json.dumps({{"tally": profile.tally.to_json(), "missing": MISSING,
                      "new": out.shape[1] - ids.shape[1]}}))
    """
).format(n=NEW_TOKENS)


def _start_server(model_dir: Path, work: Path, i: int, initial: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trustswarm.testing.step_profile", str(work / f"t{i}.json")]
    cmd += ["node", "start", "--model", str(model_dir), "--blocks", SPANS[i], "--threads", "1"]
    cmd += ["--identity", str(work / f"k{i}"), "--listen", "/ip4/127.0.0.1/tcp/0"]
    cmd += ["--log-level", "WARNING"]
    cmd += ["--initial-peers", *initial] if initial else ["--new-swarm"]
    log = (work / f"n{i}.log").open("w")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)


def _address(proc: subprocess.Popen) -> str:
    for line in proc.stdout:
        if line.startswith("/ip4/"):
            return line.strip()
    raise RuntimeError("a profiled server exited before printing its address")


def test_profile_records_every_category(tiny_model_dir: Path, tmp_path: Path):
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start_server(tiny_model_dir, tmp_path, 0, []))
        first = _address(procs[0])
        procs.append(_start_server(tiny_model_dir, tmp_path, 1, [first]))
        second = _address(procs[1])
        done = subprocess.run(
            [sys.executable, "-c", CLIENT, str(tiny_model_dir), first, second],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert result["missing"] == [] and result["new"] == NEW_TOKENS
    client = Tally.from_json(result["tally"])
    decode_steps = NEW_TOKENS - 1
    assert client.calls[PREFILL]["steps"] == 1
    assert client.calls[DECODE]["steps"] == decode_steps
    assert client.calls[DECODE]["TOTAL wall"] == decode_steps - 1  # the last has no successor
    for category in (
        "embedding",
        "LM head (norm + lm_head)",
        "codec encode",
        "codec decode",
        "ed25519 verify",
        "digests + chain links",
        "stream writes",
        "waiting for answers (reads)",
        "remote step (loop.run)",
    ):
        assert client.seconds[DECODE][category] > 0, category
    # every answer's signature is checked: one per server per decode step at least
    assert client.calls[DECODE]["ed25519 verify"] >= len(SPANS) * decode_steps
    for i, span in enumerate(SPANS):
        server = Tally.from_json(json.loads((tmp_path / f"t{i}.json").read_text()))
        start, end = map(int, span.split(":"))
        for block in range(start, end):  # each block runs once per step
            assert server.calls[DECODE][f"block {block}"] == decode_steps, (i, block)
            assert server.calls[PREFILL][f"block {block}"] == 1
        assert not any(
            c.startswith("block ") and int(c.split()[1]) >= end for c in server.calls[DECODE]
        )
        for category in ("codec decode", "codec encode", "ed25519 sign", "runner", "runner call"):
            assert server.seconds[DECODE][category] > 0, (i, category)
        assert server.calls[DECODE]["ed25519 sign"] >= decode_steps
        assert server.seconds[DECODE]["thread hop + run"] >= server.seconds[DECODE]["runner call"]
