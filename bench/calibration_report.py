"""Thresholds from the calibration measurements (the margin rule) and the markdown report."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from trustswarm.protocol.comparator import (
    FORWARD_TOLERANCES,
    GRADIENT_TOLERANCES,
    Tolerance,
)

HONEST_LOOSE = ("bf16 vs fp32", "fp16 vs fp32", "bf16 batched vs alone")
HONEST_FP32 = ("fp32 batched vs alone", "fp32 span vs chained")
REQUIRED = (
    "noise 5% tensor RMS",
    "noise 5% token RMS",
    "scale x1.05",
    "skip last block",
    "other block's weights",
    "4-bit weights",
)
REPORTED = ("noise 1% tensor RMS", "noise 1% token RMS", "scale x1.01", "int8 weights")
TABLES = {"hidden": FORWARD_TOLERANCES, "grad": GRADIENT_TOLERANCES}
# Which committed tolerance judges an honest case (the looser of the two dtypes compared).
HONEST_DTYPE = {
    "bf16 vs fp32": "bfloat16",
    "fp16 vs fp32": "float16",
    "bf16 batched vs alone": "bfloat16",
    "fp32 batched vs alone": "float32",
    "fp32 span vs chained": "float32",
}
# The margin rule: the threshold sits at the geometric mean of the honest pairs' 99th
# percentile and the mildest required cheat (equal ratio margin on both sides); if the two
# overlap, at NO_SEPARATION_MARGIN x the worst honest pair (honest servers are never
# rejected; the cheats below it are listed as not detected). Outlier tokens and the
# max-abs guard sit at GUARD_MARGIN x the worst honest value.
HONEST_QUANTILE = 0.99
NO_SEPARATION_MARGIN = 1.25
GUARD_MARGIN = 2.0
# float32 servers: FP32_MARGIN x the worst measured float32 pair, up to a power of ten, and
# at least FP32_FLOOR (kernels, BLAS and GPUs we could not measure differ more than two
# CPU runs). Far below every cheat, including a skipped block that moves the output by
# only 0.08 % (a near-identity block on degenerate input).
FP32_MARGIN = 100.0
FP32_FLOOR = 1e-4
# The tight threshold is set against the 5 % perturbations of the answer itself; the
# structural cheats (skipped block, other weights, 4-bit) are reported as measured: on
# degenerate inputs a block can move the output by less than bfloat16 rounding.
PERTURBATIONS = ("noise 5% tensor RMS", "noise 5% token RMS", "scale x1.05")


def _sig2(x: float, up: bool) -> float:
    """x rounded to 2 significant digits, up or down."""
    if x <= 0 or not math.isfinite(x):
        return x
    e = math.floor(math.log10(x)) - 1
    f = math.ceil if up else math.floor
    return f(x / 10**e) * 10**e


def _rows(rows, kind, cases, refs=("fp32", "bf16")):
    return [r for r in rows if r["kind"] == kind and r["case"] in cases and r["ref"] in refs]


def beyond_allowance(row: dict, frac: float) -> float:
    """The largest token error once the allowed outlier tokens are set aside (k = 4)."""
    tol = Tolerance(1.0, 1.0, outlier_token_fraction=frac, outlier_token_error=2.0)
    m = tol.outlier_tokens(row["tokens"])
    top = row["top_k4"]
    return top[m] if m < len(top) else 0.0


def propose(rows: list[dict], kind: str, k: int, frac: float | None = None) -> dict:
    """Worst honest, mildest required cheat and the thresholds the margin rule gives.
    With `frac` (k must be 4): the tight test on the tokens beyond the allowance."""
    key = f"rel_k{k}"
    honest = _rows(rows, kind, HONEST_LOOSE)
    fp32 = _rows(rows, kind, HONEST_FP32)
    cheats = _rows(rows, kind, PERTURBATIONS)
    if not honest or not cheats:
        return {}
    stat = (lambda r: r[key]) if frac is None else (lambda r: beyond_allowance(r, frac))
    h = max(honest, key=stat)
    c = min(cheats, key=stat)
    h32 = max((r[key] for r in fp32), default=0.0)
    hv, cv = stat(h), stat(c)
    ranked = sorted(stat(r) for r in honest)
    p99 = ranked[int(HONEST_QUANTILE * (len(ranked) - 1))]
    if cv > p99:  # separable: the geometric mean of the honest quantile and the mildest cheat
        tol = _sig2(math.sqrt(p99 * cv), up=False)
    else:  # not separable: accept every measured honest pair, with a margin
        tol = _sig2(NO_SEPARATION_MARGIN * hv, up=True)
    ratio = max(r["ratio"] for r in honest)
    ratio32 = max((r["ratio"] for r in fp32), default=0.0)
    cap = max(r[key] for r in honest)
    return {
        "k": k,
        "worst_honest": hv,
        "worst_honest_case": f"{h['case']}, span {h['span']}, prompt {h['prompt']}",
        "mildest_cheat": cv,
        "mildest_cheat_case": f"{c['case']} vs {c['ref']}, span {c['span']}, prompt {c['prompt']}",
        "margin": cv / hv if hv > 0 else math.inf,
        "honest_quantile": p99,
        "margin_quantile": cv / p99 if p99 > 0 else math.inf,
        "honest_over": sum(1 for v in ranked if v > tol),
        "honest_n": len(ranked),
        "token_rel_error": tol,
        "worst_honest_any_token": cap,
        "outlier_token_error": _sig2(GUARD_MARGIN * cap, up=True),
        "max_abs_ratio": _sig2(GUARD_MARGIN * ratio, up=True),
        "worst_honest_ratio": ratio,
        "fp32_worst_honest": h32,
        "fp32_token_rel_error": max(FP32_FLOOR, 10 ** math.ceil(math.log10(FP32_MARGIN * h32)))
        if h32 > 0
        else FP32_FLOOR,
        "fp32_worst_honest_ratio": ratio32,
    }


def rejected(row: dict, tol: Tolerance) -> bool:
    rel = row[f"rel_k{tol.outlier_channels}"]
    if rel > tol.token_cap or row["ratio"] > tol.max_abs_ratio:
        return True
    m = tol.outlier_tokens(row["tokens"])
    if m == 0:
        return rel > tol.token_rel_error
    return beyond_allowance(row, tol.outlier_token_fraction) > tol.token_rel_error


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x * 100:.2f}%" if x >= 1e-4 else f"{x:.1e}"


def case_table(rows: list[dict], kind: str) -> list[str]:
    table = TABLES[kind]
    loosest = table["bfloat16"].loosest(table["float16"])
    k = table["bfloat16"].outlier_channels
    key = f"rel_k{k}"
    out = [
        "| case | class | compared with | n | worst-token error min / median / max"
        " | max abs ratio | verdict with the committed tolerance |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = [("honest", c) for c in HONEST_LOOSE + HONEST_FP32]
    groups += [("must reject", c) for c in REQUIRED] + [("reported", c) for c in REPORTED]
    for cls, case in groups:
        for ref in ("fp32", "bf16"):
            sel = _rows(rows, kind, (case,), (ref,))
            if not sel:
                continue
            vals = sorted(r[key] for r in sel)
            tol = table[HONEST_DTYPE[case]] if cls == "honest" else loosest
            n_rej = sum(rejected(r, tol) for r in sel)
            if cls == "honest":
                verdict = f"{len(sel) - n_rej}/{len(sel)} accepted"
            else:
                verdict = f"{n_rej}/{len(sel)} rejected"
            nonfinite = sum(1 for r in sel if r.get("nonfinite"))
            if nonfinite:
                verdict += f" ({nonfinite} NaN/Inf)"
            out.append(
                f"| {case} | {cls} | {ref} | {len(sel)} | {_fmt(vals[0])} /"
                f" {_fmt(statistics.median(vals))} / {_fmt(vals[-1])}"
                f" | {max(r['ratio'] for r in sel):.3g} | {verdict} |"
            )
    return out


def k_table(rows: list[dict], kind: str, ks) -> list[str]:
    out = [
        "| outlier channels left out (k) | worst honest | mildest required cheat | margin |",
        "| --- | --- | --- | --- |",
    ]
    for k in ks:
        p = propose(rows, kind, k)
        if p:
            out.append(
                f"| {k} | {_fmt(p['worst_honest'])} | {_fmt(p['mildest_cheat'])}"
                f" | {p['margin']:.2f}x |"
            )
    return out


def span_table(rows: list[dict], kind: str, k: int) -> list[str]:
    key = f"rel_k{k}"
    spans = sorted(
        {r["span"] for r in rows if r["kind"] == kind}, key=lambda s: tuple(map(int, s.split(":")))
    )
    out = ["| span | honest bf16 vs fp32, max | same with k=0 | mildest required cheat |"]
    out.append("| --- | --- | --- | --- |")
    for span in spans:
        h = [r for r in _rows(rows, kind, ("bf16 vs fp32",)) if r["span"] == span]
        c = [r for r in _rows(rows, kind, REQUIRED) if r["span"] == span]
        if h and c:
            out.append(
                f"| {span} | {_fmt(max(r[key] for r in h))} | {_fmt(max(r['rel_k0'] for r in h))}"
                f" | {_fmt(min(r[key] for r in c))} ({min(c, key=lambda r: r[key])['case']}) |"
            )
    return out


def undetected_table(rows: list[dict], kind: str) -> list[str]:
    """How often each cheat passes: against each honest answer with the loosest committed
    tolerance (the cheater claims bfloat16), and against float32 when both send float32."""
    table = TABLES[kind]
    loosest = table["bfloat16"].loosest(table["float16"])
    out = [
        "| cheat | passes vs honest float32 (bf16 tolerance) | passes vs honest bfloat16"
        " | passes when both send float32 (float32 tolerance) |",
        "| --- | --- | --- | --- |",
    ]
    for case in REQUIRED + REPORTED:
        cells = []
        for ref, tol in (("fp32", loosest), ("bf16", loosest), ("fp32", table["float32"])):
            sel = _rows(rows, kind, (case,), (ref,))
            if not sel:
                cells.append("-")
                continue
            n = sum(not rejected(r, tol) for r in sel)
            cells.append(f"{n}/{len(sel)} ({100 * n / len(sel):.0f}%)")
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    return out


def write_report(rows: list[dict], meta: dict, path: Path) -> str:
    ks = sorted(int(k[5:]) for k in rows[0] if re.fullmatch(r"rel_k\d+", k))
    lines = [
        "# Comparator calibration on SmolLM2-135M-Instruct",
        "",
        f"Generated by `bench/calibrate.py {' '.join(meta['argv'])}` on {meta['date']}:"
        f" {meta['prompts']} prompts ({meta['prompt_kinds']}), {meta['tokens'][0]}-"
        f"{meta['tokens'][1]} tokens (mean {meta['mean_tokens']:.0f}), backward on"
        f" {meta['grad_prompts']} of them; spans {', '.join(meta['spans'])};"
        f" {meta['seconds']:.0f} s with {meta['threads']} torch threads on a shared 2-core VM"
        f" (torch {meta['torch']}). Raw numbers: `calibration.json.gz`.",
        "",
        "Errors are the comparator's own measures (`protocol/comparator.py`): per token,"
        " relative L2 error over the token's channels with the k most-different channels left"
        " out, against the quadratic mean of the two tokens' RMS; 'worst-token' is the max"
        " over the prompt's tokens (what the verdict tests). 'max abs ratio' is max |a-b| over"
        " the token's RMS (the guard). Each cheat is compared with the honest float32 answer"
        " and with the honest bfloat16 answer, and judged with the loosest committed tolerance"
        " (a cheater can always claim a bfloat16 wire dtype).",
        "",
    ]
    for kind, title in (("hidden", "Forward hidden states"), ("grad", "Backward input gradients")):
        if not any(r["kind"] == kind for r in rows):
            continue
        table = TABLES[kind]
        k = table["bfloat16"].outlier_channels
        frac = table["bfloat16"].outlier_token_fraction
        p = propose(rows, kind, k, frac)
        lines += [f"## {title}", "", "Every token must pass (no outlier tokens):", ""]
        lines += [*k_table(rows, kind, ks), ""]
        lines += [
            f"With k = {k} and up to ceil({frac:.3g} x tokens) outlier tokens (committed):"
            f" worst honest pair {_fmt(p['worst_honest'])} ({p['worst_honest_case']});"
            f" mildest 5 % perturbation {_fmt(p['mildest_cheat'])} ({p['mildest_cheat_case']});"
            f" **margin {p['margin']:.2f}x** ({p['margin_quantile']:.2f}x over the honest 99th"
            f" percentile, {_fmt(p['honest_quantile'])}). The margin rule (see"
            f" `calibration_report.py`) gives token_rel_error {p['token_rel_error']:.3g}"
            f" ({p['honest_over']} of {p['honest_n']} honest cases above it);"
            f" outlier tokens are capped at 2x the worst honest token"
            f" ({_fmt(p['worst_honest_any_token'])}): {p['outlier_token_error']:.3g};"
            f" max_abs_ratio {p['max_abs_ratio']:.3g} (2x the worst honest"
            f" {p['worst_honest_ratio']:.3g}); float32 vs float32 worst"
            f" {_fmt(p['fp32_worst_honest'])} (ratio {p['fp32_worst_honest_ratio']:.2g})"
            f" gives {p['fp32_token_rel_error']:.3g}.",
            "",
            "Committed: "
            + "; ".join(
                f"{name}: token_rel_error {t.token_rel_error:g}, outlier_token_error"
                f" {t.outlier_token_error:g}, max_abs_ratio {t.max_abs_ratio:g},"
                f" outlier_channels {t.outlier_channels}"
                for name, t in table.items()
            )
            + ".",
            "",
            *case_table(rows, kind),
            "",
            *span_table(rows, kind, k),
            "",
            "What passes undetected (the cheat's answer accepted as agreeing):",
            "",
            *undetected_table(rows, kind),
            "",
        ]
    lines += [
        "## Reading",
        "",
        "The 'What passes undetected' tables are the honest answer to what a bfloat16 peer"
        " cannot tell apart from its own rounding (1 % scaling or noise, int8 weights; and in"
        " gradients even 5 % changes and often 4-bit weights); between float32 answers every"
        " cheat measured here is rejected. Interpretation of this run: bench/README.md,"
        " section `bench/calibrate.py`.",
        "",
    ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text
