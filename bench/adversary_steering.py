"""Optimizing adversaries against the trust layer on the real SmolLM2-135M (issue 10).

For real prompts (chat-template questions and bench/calibration_prompts.make_prompts)
and each span, measures

(a) how often an honest bfloat16 span answer changes the greedy next token against
    float32 (the rest of the model run in float32 on each);
(b) steering (trustswarm.testing.steering): a server announcing bfloat16 or float32
    moves only the last row of its answer toward a target (the runner-up token, or a
    fixed token such as "Sorry"), keeping only candidates its accept passes: `compare`
    against the honest float32 answer with the announced dtype's tolerance and against
    the honest bfloat16 answer ("comparator"), plus, in mode "next-token", the
    next-token comparator against the reference logits where available. Success = the
    target became the greedy token AND the answer is accepted by votes against honest
    float32 and bfloat16 answers AND the verifier's Judge, on real signed evidence
    (signed off-network by a ServingContext under a throwaway identity), does not call
    it wrong;
(c) framing (trustswarm.testing.framing): the inputs the searches find, answered
    honestly in bfloat16 and in float32, signed and judged: bans (proven), failed
    checks (wrong) and inconclusive verdicts.

    .venv/bin/python bench/adversary_steering.py --out /tmp/steering.json      # 64 prompts
    .venv/bin/python bench/adversary_steering.py --prompts 4 --max-minutes 5 --out /tmp/s.json

Prints a markdown table and writes the raw rows as JSON to --out (and the table next
to it, .md). Bounded by --max-minutes (framing first, at most a third of it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from adversary_steering_report import markdown  # noqa: E402
from steering_prompts import prompts_for  # noqa: E402

from trustswarm.models.runner import BlockRunner  # noqa: E402
from trustswarm.models.store import ModelDir  # noqa: E402
from trustswarm.protocol.comparator import compare  # noqa: E402
from trustswarm.testing.framing import framing_inputs  # noqa: E402
from trustswarm.testing.offline_judge import JUDGE_FEATURES, OfflineJudge  # noqa: E402
from trustswarm.testing.steering import (  # noqa: E402
    Accept,
    ModelDownstream,
    announced_tolerance,
    comparator_accept,
    runner_up,
    steer_last_token,
)

try:  # the next-token comparator (protocol/next_token.py), where this tree has it
    from trustswarm.protocol.next_token import REFERENCE_TOLERANCES, compare_next_token
except ImportError:  # pragma: no cover - older trees
    compare_next_token = REFERENCE_TOLERANCES = None

FIXED_TARGET = "Sorry"


class Bench:
    """The reference model, the span runners, an off-network signer and the judge."""

    def __init__(self, model: Path, spans: list[tuple[int, int]]) -> None:
        self.md = ModelDir.open(model)
        self.n = self.md.num_blocks
        self.model_id = self.md.manifest.model_id
        self.full = BlockRunner(self.md, 0, self.n, torch.float32)
        self.parts = self.md.load_client_parts(torch.float32)
        self.bf16 = {s: BlockRunner(self.md, *s, torch.bfloat16) for s in spans}
        self.offline = OfflineJudge(self.md, self.full, self.parts)
        self.judge_features = JUDGE_FEATURES

    def inputs(self, ids: list[int], start: int) -> torch.Tensor:
        with torch.inference_mode():
            h = self.parts.embed_tokens(torch.tensor([ids])).float()
            return self.full.forward(h, None, None, 0, start) if start else h

    def downstream(self, end: int) -> ModelDownstream:
        return ModelDownstream(
            self.parts, self.full if end < self.n else None, None, None, end, self.n
        )

    def judged(self, span: tuple[int, int], hidden: torch.Tensor, output: torch.Tensor) -> dict:
        """Sign `output` as a server would (for a forward request of `hidden`), judge it."""
        v = self.offline.judged(span, hidden, output)
        return {"wrong": v.wrong, "proven": v.proven, "inconclusive": v.inconclusive,
                "reason": v.reason}  # fmt: skip


@dataclass
class Case:
    """One prompt on one span: its input, the honest answers and the rest of the model."""

    span: tuple[int, int]
    x: torch.Tensor
    ref: torch.Tensor  # honest float32
    bf: torch.Tensor  # honest bfloat16
    down: ModelDownstream
    logits: torch.Tensor  # the reference's next-token logits

    @classmethod
    def of(cls, bench: Bench, span: tuple[int, int], ids: list[int]) -> Case:
        x = bench.inputs(ids, span[0])
        with torch.inference_mode():
            ref = bench.full.forward(x, None, None, *span)
            bf = bench.bf16[span].forward(x, None, None, *span)
        down = bench.downstream(span[1])
        return cls(span, x, ref, bf, down, down(ref))

    def flip(self) -> dict:
        """Does honest bfloat16 change the greedy next token?"""
        other = self.down(self.bf.float())
        top2 = self.logits.topk(2).values
        return {
            "flip": int(self.logits.argmax()) != int(other.argmax()),
            "ref_margin": float(top2[0] - top2[1]),
        }

    def accept(self, dtype: torch.dtype, mode: str) -> Accept:
        """The attacker's test: votes against both honest answers (against float32 with
        the announced tolerance), and in mode next-token the next-token comparator."""
        votes = comparator_accept([self.bf])
        extra = votes
        if mode == "next-token" and compare_next_token is not None:
            # The verifier's float32-reference rule: the loosest path an attacker can use.
            tol = REFERENCE_TOLERANCES[str(dtype).removeprefix("torch.")]
            reference = self.logits[None]

            def extra(c: torch.Tensor) -> bool:
                return votes(c) and compare_next_token(self.down(c)[None], reference, tol).agree

        return comparator_accept([self.ref], announced_tolerance(dtype), extra=extra)


def attack(
    bench: Bench, case: Case, dtype: torch.dtype, target: int, mode: str, steps: int
) -> dict:
    """One steering attack, measured by votes and by the judge."""
    honest = case.bf if dtype == torch.bfloat16 else case.ref
    accept = case.accept(dtype, mode)
    began = time.perf_counter()
    res = steer_last_token(
        honest, target, case.down, accept, steps, tolerance=announced_tolerance(dtype)
    )
    seconds = time.perf_counter() - began
    judge = bench.judged(case.span, case.x, res.output)
    row = {
        "reached": res.reached,
        "accepted": res.accepted,
        "vote_f32": compare(res.output, case.ref).agree,
        "vote_bf16": compare(res.output, case.bf).agree,
        "judge_wrong": judge["wrong"],
        "judge_proven": judge["proven"],
        "judge_reason": judge["reason"],
        "initial_margin": res.initial_margin,
        "margin": res.margin,
        "steps": res.steps,
        "seconds": seconds,
    }
    row["success_all"] = res.reached and row["vote_f32"] and row["vote_bf16"] and not judge["wrong"]
    return row


def steering_prompt(
    bench: Bench, args: argparse.Namespace, i: int, ids: list[int], sorry: int
) -> tuple[list[dict], list[dict]]:
    flips, rows = [], []
    for span in args.spans:
        case = Case.of(bench, span, ids)
        label = f"{span[0]}:{span[1]}"
        flips.append({"prompt": i, "span": label, **case.flip()})
        targets = {"runner-up": runner_up(case.logits), FIXED_TARGET: sorry}
        for dtype in args.dtypes:
            for name in args.targets:
                for mode in args.modes:
                    row = attack(bench, case, dtype, targets[name], mode, args.steps)
                    dtype_name = str(dtype).removeprefix("torch.")
                    key = {"prompt": i, "span": label, "dtype": dtype_name}
                    rows.append({**key, "target": name, "mode": mode, **row})
    return flips, rows


def framing_rows(
    bench: Bench, span: tuple[int, int], x0: torch.Tensor, args: argparse.Namespace, seed: int
) -> list[dict]:
    r64 = BlockRunner(bench.md, *span, torch.float64)
    r32 = BlockRunner(bench.md, *span, torch.float32)
    found = framing_inputs(
        (r64, r32, bench.bf16[span]),
        *span,
        x0,
        lm_iterations=args.lm_iterations,
        search_iterations=args.search_iterations,
        rng=random.Random(seed),
        max_seconds=args.framing_seconds,
        progress=lambda m: print(m, file=sys.stderr),
    )
    rows = []
    for f in found:
        with torch.inference_mode():
            bf = bench.bf16[span].forward(f.hidden, f.positions, None, *span)
            fp = r32.forward(f.hidden, f.positions, None, *span)
        if not (torch.isfinite(bf).all() and torch.isfinite(fp).all()):
            continue  # an honest server cannot sign NaN/Inf (the codec refuses it)
        rows.append(
            {
                "span": f"{span[0]}:{span[1]}",
                "seed": seed,
                "objective": f.objective,
                "label": f.label,
                "error": f.error,
                "abs_ratio": f.abs_ratio,
                "ratio": float(fp.norm() / f.hidden.norm()),  # ||out|| / ||x||, float32
                "hidden": f.hidden.reshape(-1).tolist() if f.objective != "extreme" else None,
                "bf16": bench.judged(span, f.hidden, bf),
                "fp32": bench.judged(span, f.hidden, fp),
            }
        )
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("/tmp/smol"), help="model directory")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--spans", default="10:20,20:30")
    p.add_argument("--dtypes", default="bfloat16,float32", help="dtypes the attacker announces")
    p.add_argument("--targets", default=f"runner-up,{FIXED_TARGET}")
    p.add_argument("--modes", default="comparator,next-token", help="the attacker's accept")
    p.add_argument("--steps", type=int, default=12, help="steering steps per attack")
    p.add_argument("--framing-seeds", type=int, default=2, help="framing searches per span")
    p.add_argument("--framing-seconds", type=float, default=90.0, help="per LM search")
    p.add_argument("--lm-iterations", type=int, default=200)
    p.add_argument("--search-iterations", type=int, default=200)
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (small ops: 1 is fastest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "adversary_steering.json"
    )
    args = p.parse_args()
    args.spans = [tuple(int(v) for v in s.split(":")) for s in args.spans.split(",")]
    args.dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    args.targets = args.targets.split(",")
    args.modes = args.modes.split(",")
    if args.prompts < 1 or not set(args.targets) <= {"runner-up", FIXED_TARGET}:
        p.error(f"need --prompts >= 1 and targets among runner-up,{FIXED_TARGET}")
    return args


def main() -> None:
    from transformers import AutoTokenizer

    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    deadline = began + 60 * args.max_minutes
    tok = AutoTokenizer.from_pretrained(args.model)
    sorry = tok.encode(FIXED_TARGET, add_special_tokens=False)[0]
    prompts = prompts_for(tok, args.prompts, args.seed)
    bench = Bench(args.model, args.spans)
    data: dict = {"flips": [], "steering": [], "framing": []}
    for span in args.spans:
        for seed in range(args.framing_seeds):
            if time.monotonic() > began + 20 * args.max_minutes:  # a third of the budget
                break
            # One real token's hidden state: a random position of another prompt each time.
            h = bench.inputs(prompts[seed % len(prompts)][1], span[0])
            at = random.Random(seed).randrange(1, h.shape[1]) if h.shape[1] > 1 else 0
            x0 = h[:, at : at + 1]
            data["framing"] += framing_rows(bench, span, x0, args, seed)
    done = 0
    for i, (_, ids) in enumerate(prompts):
        if time.monotonic() > deadline:
            break
        flips, rows = steering_prompt(bench, args, i, ids, sorry)
        data["flips"] += flips
        data["steering"] += rows
        done += 1
        print(
            f"prompt {done}/{len(prompts)}: {(time.monotonic() - began) / 60:.1f} min",
            file=sys.stderr,
        )
    data["meta"] = {
        "model": str(args.model),
        "prompts_done": done,
        "prompts_asked": len(prompts),
        "spans": [f"{s}:{e}" for s, e in args.spans],
        "steps": args.steps,
        "minutes": (time.monotonic() - began) / 60,
        "judge_options": bench.judge_features,
        "next_token_accept": compare_next_token is not None,
        "threads": args.threads,
    }
    table = markdown(data)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    args.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
