"""Calibrate the output comparator (protocol/comparator.py) on the real SmolLM2-135M.

Runs a generated corpus of real prompts (prose, code, numbers, odd text, chat-template
conversations; 4..128 tokens) through the client's embedding and the float32 blocks to get
realistic inputs for each block span, then measures the comparator's per-token errors of

* honest variation (must be accepted): bfloat16 vs float32, float16 vs float32, and the same
  dtype computed alone vs inside a padded batch of other prompts;
* required cheats (must be rejected every time): Gaussian noise at 5 % of the tensor's RMS
  (and, harder, at 5 % of each token's RMS), output scaled x1.05, the span's last block
  skipped, the span's last block computed with another block's weights, every weight of the
  span quantised to 4 bits (symmetric, groups of 32);
* reported cheats: 1 % noise, x1.01 scaling, int8 per-channel weights;

for forward hidden states and for backward input gradients (grad_outputs from the LM loss
or a random direction at the model output, backpropagated in float32). Each cheat is
compared with both honest answers (float32 and bfloat16) under the loosest tolerance.

    .venv/bin/python bench/calibrate.py                      # ~300 prompts
    .venv/bin/python bench/calibrate.py --prompts 40 --out /tmp/cal   # quick look

Writes bench/results/calibration.md and calibration.json.gz (raw per-case numbers);
`--report-only` rewrites the markdown from them.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from calibration_prompts import make_prompts  # noqa: E402
from calibration_report import write_report  # noqa: E402

from trustswarm.models.runner import BlockRunner  # noqa: E402
from trustswarm.models.store import ModelDir  # noqa: E402
from trustswarm.protocol.comparator import token_errors  # noqa: E402
from trustswarm.testing.weight_cheats import (  # noqa: E402
    noise_tensor,
    noise_token,
    quantise_int4,
    quantise_int8,
    quantised_runner,
    swapped_runner,
)

RAW_FILE = "calibration.json.gz"
SPANS = [(0, 10), (10, 20), (20, 30), (0, 1), (9, 10), (20, 21), (29, 30)]
KS = (0, 1, 2, 4, 8)  # outlier_channels settings measured
TOP_K, TOP_N = 4, 8  # for k = TOP_K, the TOP_N largest token errors of each prompt
HONEST = ("bf16 vs fp32", "fp16 vs fp32", "bf16 batched vs alone", "fp32 batched vs alone")
HONEST += ("fp32 span vs chained",)
REQUIRED = ("noise 5% tensor RMS", "noise 5% token RMS", "scale x1.05", "skip last block")
REQUIRED += ("other block's weights", "4-bit weights")
REPORTED = ("noise 1% tensor RMS", "noise 1% token RMS", "scale x1.01", "int8 weights")


class Recorder:
    """One row of measures per (kind, case, span, prompt, reference)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, kind, case, span, pids, lens, ref, a, b) -> None:
        """a, b: [B, T, H] right-padded batches; row i holds prompt pids[i], lens[i] tokens."""
        bsz, t, _ = a.shape
        real = torch.arange(t)[None, :] < torch.tensor(lens)[:, None]
        finite = (torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1)) | ~real
        bad = ~finite.all(-1)
        if bool(bad.any()):
            a = torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype))
            b = torch.where(torch.isfinite(b), b, torch.zeros((), dtype=b.dtype))
        rows = [
            {"kind": kind, "case": case, "span": f"{span[0]}:{span[1]}", "prompt": pid}
            | {"ref": ref, "tokens": n}
            for pid, n in zip(pids, lens, strict=True)
        ]
        for k in KS:
            err = token_errors(a, b, k)
            rel = err.rel_error.view(bsz, t).masked_fill(~real, -1.0)
            worst, where = rel.max(-1)
            for i, row in enumerate(rows):
                row[f"rel_k{k}"] = float(worst[i]) if not bad[i] else float("inf")
                if k == 0:
                    ratio = err.abs_ratio.view(bsz, t).masked_fill(~real, -1.0).amax(-1)
                    row["ratio"] = float(ratio[i]) if not bad[i] else float("inf")
                    row["worst_token"] = int(where[i])
                    if bad[i]:
                        row["nonfinite"] = True
            if k == TOP_K:  # the largest few token errors: any outlier-token allowance
                top = rel.topk(min(TOP_N, t), dim=-1).values
                for i, row in enumerate(rows):
                    vals = [float(v) for v in top[i] if v >= 0]
                    row[f"top_k{k}"] = vals if not bad[i] else [float("inf")]
        self.rows.extend(rows)


def batches(prompts, max_batch: int, max_tokens: int):
    """Indices of prompts grouped by similar length (right padding wastes little)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][1]))
    group: list[int] = []
    for i in order:
        longest = max([len(prompts[j][1]) for j in group] + [len(prompts[i][1])])
        if group and (len(group) >= max_batch or longest * (len(group) + 1) > max_tokens):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


class Calibration:
    def __init__(self, model_dir: Path, seed: int) -> None:
        self.md = ModelDir.open(model_dir)
        self.n = self.md.num_blocks
        self.parts = self.md.load_client_parts()
        self.r32 = BlockRunner(self.md, 0, self.n, torch.float32)
        self.r16 = BlockRunner(self.md, 0, self.n, torch.bfloat16)
        self.rf16 = BlockRunner(self.md, 0, self.n, torch.float16)
        self.q4 = quantised_runner(self.r32, quantise_int4)
        self.q8 = quantised_runner(self.r32, quantise_int8)
        self.swapped = {e - 1: swapped_runner(self.r32, e - 1) for _, e in SPANS}
        self.gen = torch.Generator().manual_seed(seed)
        self.rec = Recorder()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timer(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    # -- inputs -----------------------------------------------------------------------

    def embed(self, ids_list: list[list[int]], pad_id: int):
        t = max(len(x) for x in ids_list)
        ids = torch.full((len(ids_list), t), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(ids_list), t), dtype=torch.int64)
        for i, x in enumerate(ids_list):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        with torch.no_grad():
            h = self.parts.embed_tokens(ids)
        return ids, (None if len(ids_list) == 1 else mask), h

    def states(self, h, mask):
        out = [h]
        for i in range(self.n):
            out.append(self.r32.forward(out[-1], attention_mask=mask, start=i, end=i + 1))
        return out

    # -- comparisons --------------------------------------------------------------------

    def record_cheats(self, kind, span, pids, lens, ref32, ref16, cheats) -> None:
        for case, c in cheats.items():
            self.rec.add(kind, case, span, pids, lens, "fp32", c, ref32)
            self.rec.add(kind, case, span, pids, lens, "bf16", c, ref16)

    def tampered(self, x, lens):
        g = self.gen
        real = (torch.arange(x.shape[1])[None, :] < torch.tensor(lens)[:, None]).unsqueeze(-1)
        return {
            "noise 5% tensor RMS": noise_tensor(x, 0.05, g, real),
            "noise 5% token RMS": noise_token(x, 0.05, g),
            "scale x1.05": x * 1.05,
            "noise 1% tensor RMS": noise_tensor(x, 0.01, g, real),
            "noise 1% token RMS": noise_token(x, 0.01, g),
            "scale x1.01": x * 1.01,
        }

    def forward_batch(self, pids, lens, mask, states, extras: bool, alone: int) -> None:
        """All forward cases of one batch; `extras`: also float16 and int8 weights;
        `alone`: how many of its prompts to recompute alone (batch-composition variation)."""
        for s, e in SPANS:
            x = states[s]
            with self.timer("bf16"):
                bf16 = self.r16.forward(x, attention_mask=mask, start=s, end=e)
            out = {"skip last block": states[e - 1]}
            with self.timer("cheats"):
                out["other block's weights"] = self.swapped[e - 1].forward(
                    states[e - 1], attention_mask=mask, start=e - 1, end=e
                )
                out["4-bit weights"] = self.q4.forward(x, attention_mask=mask, start=s, end=e)
            if extras:
                with self.timer("extras"):
                    out["int8 weights"] = self.q8.forward(x, attention_mask=mask, start=s, end=e)
                    fp16 = self.rf16.forward(x, attention_mask=mask, start=s, end=e)
            with self.timer("compare"):
                ref, span, add = states[e], (s, e), self.rec.add
                add("hidden", "bf16 vs fp32", span, pids, lens, "fp32", bf16, ref)
                if extras:
                    add("hidden", "fp16 vs fp32", span, pids, lens, "fp32", fp16, ref)
                out.update(self.tampered(ref, lens))
                self.record_cheats("hidden", span, pids, lens, ref, bf16, out)
            if len(pids) > 1 and e - s > 1:
                with self.timer("alone"):
                    for row, (pid, n) in list(enumerate(zip(pids, lens, strict=True)))[:alone]:
                        x1 = states[s][row : row + 1, :n]
                        for case, r, batched in (
                            ("bf16", self.r16, bf16),
                            ("fp32", self.r32, states[e]),
                        ):
                            self.rec.add(
                                "hidden",
                                f"{case} batched vs alone",
                                (s, e),
                                [pid],
                                [n],
                                case,
                                batched[row : row + 1, :n],
                                r.forward(x1, start=s, end=e),
                            )

    def grad_outputs(self, ids, mask, states, mode: str) -> torch.Tensor:
        """d loss / d output of the last block: LM loss of the prompt, or a random direction."""
        if mode == "random":
            g = torch.randn(states[-1].shape, generator=self.gen)
            return g if mask is None else g * mask.unsqueeze(-1)
        with torch.enable_grad():
            x = states[-1].clone().requires_grad_(True)
            logits = self.parts.lm_head(self.parts.norm(x)).float()
            labels = ids[:, 1:].clone()
            if mask is not None:
                labels[mask[:, 1:] == 0] = -100
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1)
            )
            (g,) = torch.autograd.grad(loss, x)
        return g

    def backward_batch(self, pids, lens, ids, mask, states, mode, check_chain, extras) -> None:
        g = [None] * (self.n + 1)
        with self.timer("grad fp32"):
            g[self.n] = self.grad_outputs(ids, mask, states, mode)
            for i in reversed(range(self.n)):  # float32 reference for every span, block by block
                g[i] = self.r32.backward(
                    states[i], g[i + 1], attention_mask=mask, start=i, end=i + 1
                )
        r32 = self.r32
        for s, e in SPANS:
            x, go = states[s], g[e]

            def before_last(grad, s=s, e=e):
                if e - 1 == s:
                    return grad
                return r32.backward(states[s], grad, attention_mask=mask, start=s, end=e - 1)

            with self.timer("grad bf16"):
                out = {"bf16": self.r16.backward(x, go, attention_mask=mask, start=s, end=e)}
            with self.timer("grad cheats"):
                other = self.swapped[e - 1].backward(
                    states[e - 1], go, attention_mask=mask, start=e - 1, end=e
                )
                out["skip last block"] = before_last(go)
                out["other block's weights"] = before_last(other)
                out["4-bit weights"] = self.q4.backward(x, go, attention_mask=mask, start=s, end=e)
            with self.timer("grad extras"):
                if extras:
                    out["int8 weights"] = self.q8.backward(
                        x, go, attention_mask=mask, start=s, end=e
                    )
                if check_chain:
                    out["span"] = r32.backward(x, go, attention_mask=mask, start=s, end=e)
            with self.timer("compare"):
                ref, span, add = g[s], (s, e), self.rec.add
                bf = out.pop("bf16")
                add("grad", "bf16 vs fp32", span, pids, lens, "fp32", bf, ref)
                if check_chain:
                    chained = out.pop("span")
                    add("grad", "fp32 span vs chained", span, pids, lens, "fp32", chained, ref)
                out.update(self.tampered(ref, lens))
                self.record_cheats("grad", span, pids, lens, ref, bf, out)


def main() -> None:
    from transformers import AutoTokenizer

    from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--prompts", type=int, default=300, help="prompts for forward calibration")
    p.add_argument("--grad-every", type=int, default=8, help="backward on every n-th batch")
    p.add_argument(
        "--extra-every", type=int, default=2, help="float16 and int8 cases on every n-th batch"
    )
    p.add_argument("--grad-batch", type=int, default=4, help="prompts of a batch run backward")
    p.add_argument("--alone", type=int, default=1, help="prompts per batch also run alone")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512, help="padded tokens per batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see README)")
    p.add_argument("--max-minutes", type=float, default=float("inf"), help="time budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite calibration.md from calibration.json"
    )
    args = p.parse_args()
    if args.report_only:
        data = json.loads(gzip.decompress((args.out / RAW_FILE).read_bytes()))
        print(write_report(data["rows"], data["meta"], args.out / "calibration.md"))
        return

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_model(args.model_dir)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = make_prompts(tok, args.prompts, seed=args.seed)
    cal = Calibration(args.model_dir, args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    groups = list(batches(prompts, args.max_batch, args.max_tokens))
    # Shuffled so that a run stopped by --max-minutes measured a random subset of lengths.
    random.Random(args.seed).shuffle(groups)
    args.out.mkdir(parents=True, exist_ok=True)
    done: list[int] = []
    grad_prompts = 0
    with torch.inference_mode(False):
        for bi, pids in enumerate(groups):
            if time.perf_counter() - t0 > 60 * args.max_minutes:
                print(f"time budget of {args.max_minutes} min reached: stopping", flush=True)
                break
            lens = [len(prompts[i][1]) for i in pids]
            ids, mask, h = cal.embed([prompts[i][1] for i in pids], pad)
            with cal.timer("fp32"):
                states = cal.states(h, mask)
            extras = bi % args.extra_every == 0
            cal.forward_batch(pids, lens, mask, states, extras, args.alone)
            if bi % args.grad_every == 0:
                mode = "loss" if (bi // args.grad_every) % 2 == 0 else "random"
                g = args.grad_batch
                cal.backward_batch(
                    pids[:g],
                    lens[:g],
                    ids[:g],
                    None if mask is None else mask[:g],
                    [x[:g] for x in states],
                    mode,
                    check_chain=bi == 0,
                    extras=extras,
                )
                grad_prompts += len(pids[:g])
            done += pids
            print(
                f"batch {bi + 1}/{len(groups)}: {len(done)} prompts, grads on {grad_prompts},"
                f" {time.perf_counter() - t0:.0f} s; "
                + " ".join(f"{k} {v:.0f}" for k, v in cal.seconds.items()),
                flush=True,
            )
            # Written after every batch: a stopped run still leaves its results.
            text = save(args, cal, [prompts[i] for i in done], grad_prompts, t0)
    print(text)


def _round(x):
    """4 significant digits: plenty for errors, and the raw file stays small."""
    if isinstance(x, float):
        return float(f"{x:.4g}")
    return [_round(v) for v in x] if isinstance(x, list) else x


def save(args, cal: Calibration, prompts, grad_prompts: int, t0: float) -> str:
    kinds = [k for k, _ in prompts]
    meta = {
        "prompts": len(prompts),
        "grad_prompts": grad_prompts,
        "prompt_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
        "tokens": [min(len(x) for _, x in prompts), max(len(x) for _, x in prompts)],
        "mean_tokens": sum(len(x) for _, x in prompts) / len(prompts),
        "spans": [f"{s}:{e}" for s, e in SPANS],
        "seconds": round(time.perf_counter() - t0, 1),
        "stage_seconds": {k: round(v, 1) for k, v in cal.seconds.items()},
        "threads": args.threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "argv": sys.argv[1:],
    }
    rows = [{k: _round(v) for k, v in row.items()} for row in cal.rec.rows]
    raw = json.dumps({"meta": meta, "rows": rows}, separators=(",", ":"))
    (args.out / RAW_FILE).write_bytes(gzip.compress(raw.encode(), mtime=0))
    return write_report(cal.rec.rows, meta, args.out / "calibration.md")


if __name__ == "__main__":
    main()
