"""bench/audits.py's results next to the bound (SECURITY.md, "Audits: the bound").

For a server that cheats on a fraction f of the exchanges it serves to auditing clients
(here: a session hop with at least one tampered answer, f = 1 - (1 - f_answer)^steps),
audited at rate r, serving them λ exchanges per second, with judging latency T_j:

    E[time to ban]                      ≈ 1 / (r f λ) + T_j
    E[wrong exchanges before the ban]   ≈ 1 / r + λ f T_j

Each trial is one draw of a geometric variable (its standard deviation is about its
mean), so single trials scatter widely around the bound; the means over trials of one f
are the figures to compare.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path


def session_fraction(answer_fraction: float, steps: int) -> float:
    """Share of sessions holding at least one tampered answer."""
    return 1.0 - (1.0 - answer_fraction) ** steps


def cheated_share(trial: dict, steps: int) -> float:
    """f: the share of the client's sessions the cheater tampered with. Measured where the
    trial saw sessions (a recognising cheater's signal decides it), else from the nominal
    share of answers."""
    if trial["sessions"]:
        return trial["wrong_sessions"] / trial["sessions"]
    return session_fraction(trial["fraction"], steps)


def bounds(trial: dict, r: float, steps: int, judging: float) -> dict:
    f = cheated_share(trial, steps)
    rate = trial["sessions"] / trial["seconds"] if trial["seconds"] else 0.0
    wrong = 1.0 / r + rate * f * judging
    return {
        "f_sessions": f,
        "lambda": rate,
        "time_bound": (1.0 / (r * f * rate) + judging) if rate and f else float("inf"),
        "wrong_sessions_bound": wrong,
        "wrong_answers_bound": (
            wrong * trial["wrong_answers"] / trial["wrong_sessions"]
            if trial["wrong_sessions"]
            else 0.0
        ),
    }


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "–"
    return "∞" if x == float("inf") else f"{x:.{digits}f}"


def trial_rows(trials: list[dict], setup: dict) -> tuple[list[str], dict]:
    r, steps = setup["audit_rate"], setup["new_tokens"]
    judgings = [t["judging"] for t in trials if t["judging"] is not None]
    typical = statistics.median(judgings) if judgings else 0.0
    rows, by_f = [], {}
    for i, t in enumerate(trials):
        b = bounds(t, r, steps, t["judging"] if t["judging"] is not None else typical)
        banned = t["banned_after"] is not None
        by_f.setdefault(t.get("kind", f"noise:{t['fraction']:g}"), []).append((t, b))
        rows.append(
            f"| {i} | {t.get('kind', t['fraction'])} | {b['f_sessions']:.2f} | {b['lambda']:.3f} | "
            f"{_fmt(t['banned_after']) if banned else '> ' + _fmt(t['seconds'])} | "
            f"{_fmt(b['time_bound'])} | {t['wrong_sessions']} | {b['wrong_sessions_bound']:.0f} | "
            f"{t['wrong_answers']} | {b['wrong_answers_bound']:.0f} | {t['sessions']} | "
            f"{_fmt(t['excluded_after'], 1)} | {_fmt(t['judging'], 1)} | {t['failed_audits']} | "
            f"{t.get('caught_by') or '–'} |"
        )
    return rows, by_f


def summary_rows(by_f: dict) -> list[str]:
    rows = []
    for kind, items in by_f.items():
        banned = [(t, b) for t, b in items if t["banned_after"] is not None]
        if not banned:
            rows.append(f"| {kind} | {len(items)} | 0 | – | – | – | – | – |")
            continue
        mean = statistics.mean
        bounds_ = [b["time_bound"] for _, b in banned if b["time_bound"] != float("inf")]
        by = Counter(t.get("caught_by") or "?" for t, _ in banned)
        rows.append(
            f"| {kind} | {len(items)} | {len(banned)} | "
            f"{mean(t['banned_after'] for t, _ in banned):.0f} | "
            f"{_fmt(mean(bounds_) if bounds_ else None)} | "
            f"{mean(t['wrong_sessions'] for t, _ in banned):.1f} | "
            f"{mean(b['wrong_sessions_bound'] for _, b in banned):.1f} | "
            f"{by.get('audit', 0)} / {by.get('spot-check', 0)} |"
        )
    return rows


def audit_rows(audits: list[dict], trials: list[dict], setup: dict) -> list[str]:
    cheaters = {t["cheater"] for t in trials}
    honest = [a for a in audits if a["server"] not in cheaters]
    requests = sum(t.get("requests", t["sessions"]) for t in trials) or 1
    cpu = sum(a["cpu"] for a in audits)
    outcomes = Counter(a["outcome"] for a in audits)
    honest_bad = sum(a["outcome"] in ("fail", "fraud") for a in honest)
    return [
        f"* audits judged: {len(audits)} ({dict(outcomes)}); of honest servers "
        f"(0:10, 20:30): {len(honest)}, penalised: **{honest_bad}**",
        f"* verifier CPU judging audits: {cpu:.1f} s in total, "
        f"{cpu / max(1, len(audits)):.2f} s per audit, **{cpu / requests:.3f} s per client "
        f"request** (one request = one {setup['new_tokens']}-token generation through 3 "
        f"servers; {requests} requests)",
        f"* verifier process CPU over the whole run (audits, discovery, gossip, records): "
        f"{setup['verifier_cpu_seconds']:.0f} s in {setup['wall_seconds'] / 60:.0f} min",
    ]


def write_report(out: Path, setup: dict, trials: list[dict], audits: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "audits.json").write_text(
        json.dumps({"setup": setup, "trials": trials, "audits": audits}, indent=1)
    )
    rows, by_f = trial_rows(trials, setup)
    r = setup["audit_rate"]
    lines = [
        "# Client audits and client-like checks against cheaters that recognise checks (bench/audits.py)",
        "",
        f"Real SmolLM2-135M, real processes on loopback (2-core VM, shared): honest 0:10 and "
        "20:30, a cheater on 10:20 (the only 10:20 server; a fresh identity per trial): one of "
        "trustswarm.testing.recognising's cheaters, which skip a block only when one signal "
        "says the asker is a client (stream reuse, gossip subscription, connection age > 20 s, "
        "inference step >= 7) or on 2 % of answers (rare), or the demo's noise cheater "
        f"(noise at {setup['amount']:.0%} of each token's RMS); one verifier "
        f"({'default settings, spot-checks on' if setup.get('spot_checks') else 'spot-checks off'}), "
        f"one client generating {setup['new_tokens']}-token greedy sessions "
        f"back to back at audit_rate r = {r}. Bound (SECURITY.md): time to ban "
        f"≈ 1/(r·f·λ) + T_j, wrong exchanges before it ≈ 1/r + λ·f·T_j = {1 / r:.0f} + …, "
        "with f the share of sessions holding a tampered answer and λ sessions/s.",
        "",
        f"Run: `{setup.get('command', 'python bench/audits.py')}` "
        f"({setup['wall_seconds'] / 60:.0f} min; load average {setup.get('load', '?')} at the end).",
        "",
        "## Per cheater (means over the trials that ended in a ban; the audit bound over trials "
        "with at least one session)",
        "",
        "| cheater | trials | banned | time to ban (s) | audit bound (s) | wrong sessions | "
        "bound | caught by audit / spot-check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *summary_rows(by_f),
        "",
        "## Trials",
        "",
        "| # | cheater | f sessions | λ (sessions/s) | time to ban (s) | bound (s) | "
        "wrong sessions | bound | wrong answers | bound | sessions | client excluded (s) | "
        "T_j (s) | failed audits | caught by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "## Audits and their cost",
        "",
        *audit_rows(audits, trials, setup),
        "",
        "Time to ban is measured from the trial's first session to the verifier's ban (its log); "
        "'client excluded' is when the client's trust view held the ban record. T_j is the "
        "proving audit's wait in the verifier's queue plus its recomputation. Each trial is one "
        "draw of a geometric variable: its standard deviation is about its mean.",
        "",
    ]
    (out / "audits.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":  # re-render the markdown from a run's audits.json
    data = json.loads(Path(sys.argv[1]).read_text())
    write_report(Path(sys.argv[1]).parent, data["setup"], data["trials"], data["audits"])
