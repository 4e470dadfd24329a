"""Markdown tables for bench/adversary_steering.py's JSON (rates per group of cases)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable


def _pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f} %)" if whole else "-"


def _groups(rows: Iterable[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        out[tuple(row[k] for k in keys)].append(row)
    return dict(sorted(out.items(), key=lambda kv: tuple(str(k) for k in kv[0])))


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def flips_table(rows: list[dict]) -> str:
    lines = []
    for (span,), group in _groups(rows, ("span",)).items():
        flips = sum(r["flip"] for r in group)
        near = [r["ref_margin"] for r in group if r["flip"]]
        worst = f"{max(near):.3f}" if near else "-"
        lines.append([span, str(len(group)), _pct(flips, len(group)), worst])
    header = ["span", "prompts", "honest bf16 flips the greedy token", "largest flipped margin"]
    return _table(header, lines)


def _count(group: list[dict], test: Callable[[dict], bool]) -> str:
    return _pct(sum(1 for r in group if test(r)), len(group))


def steering_table(rows: list[dict]) -> str:
    keys = ("span", "dtype", "target", "mode")
    lines = []
    for key, group in _groups(rows, keys).items():
        seconds = sum(r["seconds"] for r in group) / len(group)
        lines.append(
            [
                *map(str, key),
                _count(group, lambda r: r["reached"]),
                _count(group, lambda r: r["reached"] and r["vote_f32"]),
                _count(group, lambda r: r["reached"] and r["vote_bf16"]),
                _count(group, lambda r: r["reached"] and not r["judge_wrong"]),
                _count(group, lambda r: r["success_all"]),
                str(sum(r["judge_proven"] for r in group)),
                f"{seconds:.1f}",
            ]
        )
    header = [
        "span",
        "announced",
        "target",
        "attacker's accept",
        "target reached",
        "+ vote vs fp32",
        "+ vote vs bf16",
        "+ judge passes",
        "all three",
        "judge: proven",
        "s / attack",
    ]
    return _table(header, lines)


def framing_table(rows: list[dict]) -> str:
    lines = []
    for (span, objective), group in _groups(rows, ("span", "objective")).items():
        best = max(r["error"] for r in group)
        line = [span, objective, str(len(group)), f"{best:.3g}"]
        for honest in ("bf16", "fp32"):
            line += [
                _count(group, lambda r, h=honest: r[h]["wrong"]),
                _count(group, lambda r, h=honest: r[h]["proven"]),
                _count(group, lambda r, h=honest: r[h]["inconclusive"]),
            ]
        lines.append(line)
    header = ["span", "objective", "inputs", "worst honest bf16-vs-fp32 error"]
    for honest in ("bf16", "fp32"):
        header += [f"honest {honest}: failed", f"{honest}: banned", f"{honest}: inconclusive"]
    return _table(header, lines)


def markdown(data: dict) -> str:
    meta = data["meta"]
    options = ", ".join(meta["judge_options"]) or "none"
    parts = [
        "# Optimizing adversaries on SmolLM2-135M (bench/adversary_steering.py)",
        "",
        f"{meta['prompts_done']} prompts, spans {', '.join(meta['spans'])}, "
        f"{meta['minutes']:.1f} min; the judge's options: {options}; "
        f"attacker's next-token check: {meta['next_token_accept']}.",
        "",
        "## (a) Honest bfloat16 vs float32: does the greedy next token change?",
        "",
        flips_table(data["flips"]),
        "",
        "## (b) Steering the last row toward a target token",
        "",
        "Each cell: cases where the target became the greedy token and the answer also",
        "passed the named check (votes: `compare` against the honest answer; judge: the",
        "verifier's `Judge` on signed evidence, not wrong).",
        "",
        steering_table(data["steering"]),
        "",
        "## (c) Framing: honest answers to the framing searches' inputs, judged",
        "",
        framing_table(data["framing"]) if data["framing"] else "(no framing run)",
        "",
    ]
    return "\n".join(parts)
