"""Calibrate the issue-10 acceptance rules on the real SmolLM2-135M.

Measures, over >= 200 real prompts (bench/calibration_prompts.py) and spans 0:10, 10:20,
20:30, with honest bfloat16 / float16 vs float32 and with required cheats:

* the hidden-state comparator as committed (massive channels only, no outlier slot at the
  next-token position): honest accepted, cheats rejected, margins;
* the next-token comparator (protocol/next_token.py): honest spread and flip margins of
  the logits at the last position (the rest of the model run in float32), and how often
  honest bfloat16 changes the greedy next token;
* the conditioning kappa_t = S_t / max|out_t| (S_t: peak of the input plus the peak of
  every residual term, models/residual.py) of natural tokens: the verifier's limit for
  "well-conditioned" must sit above all of them.

    .venv/bin/python bench/calibrate_trust.py --model /tmp/smol --prompts 240

Writes bench/results/calibration_trust.md and .json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from calibration_prompts import make_prompts  # noqa: E402

from trustswarm.models.runner import BlockRunner  # noqa: E402
from trustswarm.models.store import ModelDir  # noqa: E402
from trustswarm.protocol.comparator import FORWARD_TOLERANCES, compare  # noqa: E402
from trustswarm.protocol.next_token import NEXT_TOKEN_TOLERANCES, compare_next_token  # noqa: E402

SPANS = [(0, 10), (10, 20), (20, 30)]
HONEST = ("bf16", "fp16")
CHEATS = ("noise 5% token RMS", "scale x1.05", "skip last block")


class Calibration:
    def __init__(self, model: Path) -> None:
        self.md = ModelDir.open(model)
        self.n = self.md.num_blocks
        self.parts = self.md.load_client_parts()
        self.r32 = BlockRunner(self.md, 0, self.n, torch.float32)
        self.r16 = BlockRunner(self.md, 0, self.n, torch.bfloat16)
        self.rf16 = BlockRunner(self.md, 0, self.n, torch.float16)
        self.rows: list[dict] = []

    def logits(self, out: torch.Tensor, end: int) -> torch.Tensor:
        h = out.float()
        if end < self.n:
            h = self.r32.forward(h, start=end, end=self.n).float()
        with torch.no_grad():
            return self.parts.lm_head(self.parts.norm(h[:, -1])).float()

    def answers(self, x: torch.Tensor, ref: torch.Tensor, s: int, e: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        token_rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
        return {
            "bf16": self.r16.forward(x, start=s, end=e),
            "fp16": self.rf16.forward(x, start=s, end=e),
            "noise 5% token RMS": ref + 0.05 * token_rms * torch.randn(ref.shape, generator=g),
            "scale x1.05": ref * 1.05,
            "skip last block": self.r32.forward(x, start=s, end=e - 1) if e - s > 1 else ref * 0,
        }

    def prompt(self, pid: int, ids: list[int]) -> None:
        with torch.no_grad():
            x = self.parts.embed_tokens(torch.tensor([ids])).float()
        for s, e in SPANS:
            ref, scale = self.r32.forward_with_scale(x, start=s, end=e)
            ref_logits = self.logits(ref, e)
            kappa = scale[0] / ref[0].abs().amax(-1)
            row = {"prompt": pid, "span": f"{s}:{e}", "tokens": len(ids)}
            row["kappa_max"] = float(kappa.max())
            row["kappa_last"] = float(kappa[-1])
            top2 = ref_logits[0].topk(2).values
            row["gap"] = float(top2[0] - top2[1])
            for name, answer in self.answers(x, ref, s, e, pid).items():
                tol = FORWARD_TOLERANCES["bfloat16"]
                v = compare(answer, ref, tolerance=tol)
                nt = compare_next_token(
                    self.logits(answer, e), ref_logits, NEXT_TOKEN_TOLERANCES["bfloat16"]
                )
                flip = int(self.logits(answer, e).argmax()) != int(ref_logits.argmax())
                row[name] = {
                    "accepted": v.agree,
                    "worst": v.worst_token_error,
                    "ratio": v.worst_abs_ratio,
                    "reason": v.reason[:80],
                    "nt_accepted": nt.agree,
                    "spread": nt.worst_token_error,
                    "flip_margin": nt.max_abs_error,
                    "flip": flip,
                }
            self.rows.append(row)
            x = ref


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def report(rows: list[dict], header: str) -> str:
    lines = [
        "# Acceptance rules of issue 10, calibrated on SmolLM2-135M-Instruct",
        "",
        header,
        "",
        "Hidden states: `compare(answer, float32 reference)` with the committed bfloat16 "
        "tolerance (massive channels only; the last token held to the bulk tolerance). "
        "Next token: `compare_next_token` on the logits at the last position (the rest of "
        "the model in float32) with the committed bfloat16 next-token tolerance.",
        "",
        "| span | case | n | hidden accepted | worst-token error median / max | "
        "next-token accepted | spread max | greedy token changed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s, e in SPANS:
        span_rows = [r for r in rows if r["span"] == f"{s}:{e}"]
        for case in HONEST + CHEATS:
            cells = [r[case] for r in span_rows]
            worst = [c["worst"] for c in cells if c["worst"] == c["worst"]]
            lines.append(
                f"| {s}:{e} | {case} | {len(cells)} | {sum(c['accepted'] for c in cells)} | "
                f"{_pct(worst, 0.5):.3%} / {max(worst, default=float('nan')):.3%} | "
                f"{sum(c['nt_accepted'] for c in cells)} | "
                f"{max(c['spread'] for c in cells):.3f} | {sum(c['flip'] for c in cells)} |"
            )
    honest = [r[c] for r in rows for c in HONEST]
    flips = [c["flip_margin"] for c in honest if c["flip"]]
    kappas = [r["kappa_max"] for r in rows]
    gaps = [r["gap"] for r in rows]
    lines += [
        "",
        f"Honest (bf16 and fp16) next-token spread: median {_pct([c['spread'] for c in honest], 0.5):.3f},"
        f" max {max(c['spread'] for c in honest):.3f} logits; greedy token changed in "
        f"{len(flips)} of {len(honest)} cases, flip margins up to "
        f"{max(flips, default=0.0):.3f} logits.",
        f"Reference top-2 gaps below the bfloat16 flip_gap "
        f"({NEXT_TOKEN_TOLERANCES['bfloat16'].flip_gap}): "
        f"{sum(g <= NEXT_TOKEN_TOLERANCES['bfloat16'].flip_gap for g in gaps)} of {len(gaps)}"
        " (where a steering server may pick the runner-up without failing the next-token rule).",
        f"Conditioning kappa of natural tokens: median {_pct(kappas, 0.5):.1f}, "
        f"p99 {_pct(kappas, 0.99):.1f}, max {max(kappas):.1f} (max over each prompt's tokens).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    cal = Calibration(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = make_prompts(tokenizer, args.prompts, seed=args.seed)
    t0 = time.perf_counter()
    for pid, (_, ids) in enumerate(prompts):
        cal.prompt(pid, ids)
    header = (
        f"Generated by `bench/calibrate_trust.py --prompts {args.prompts} --seed {args.seed}` "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {len(prompts)} prompts, "
        f"{time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
        f"{args.threads} threads."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration_trust.json").write_text(json.dumps(cal.rows))
    text = report(cal.rows, header)
    (args.out / "calibration_trust.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
