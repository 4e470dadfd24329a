"""Rows of the performance table and their Markdown / PNG renderings."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from table_measure import COLUMNS, Workload

NOISY = 0.20  # (max - min) / median above this: the figure is marked noisy


@dataclass
class Row:
    key: str
    label: str
    values: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""  # "not available: ..." when the row could not run
    foreign_cores: float | None = None  # CPU other processes took while it ran
    seconds: float = 0.0

    @property
    def available(self) -> bool:
        return bool(self.values)

    def median(self, column: str) -> float | None:
        values = self.values.get(column)
        return statistics.median(values) if values else None


def spread(values: list[float]) -> float:
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def cell(row: Row, column: str, local: Row | None, offload: Row | None) -> str:
    values = row.values.get(column)
    if not values:
        return "n/a"
    mid = statistics.median(values)
    text = f"**{_fmt(mid)}**"
    if len(values) > 1:
        text += f" [{_fmt(min(values))}–{_fmt(max(values))}]"
        if spread(values) > NOISY:
            text += " ⚠"
    ratios = []
    for ref, tag in ((local, "local"), (offload, "offl.")):
        base = ref.median(column) if ref is not None and ref is not row else None
        if base:
            ratios.append(f"{mid / base:.2g}× {tag}")
    return text + ("<br>" + ", ".join(ratios) if ratios else "")


def markdown(rows: list[Row], workload: Workload, header: list[str], notes: list[str]) -> str:
    local = next((r for r in rows if r.key == "local"), None)
    offload = next((r for r in rows if r.key == "offload"), None)
    out = ["# Performance table: SmolLM2-135M-Instruct on one machine", ""]
    out += header + [""]
    out.append(
        "| setup | "
        + " | ".join(workload.title(c) for c in COLUMNS)
        + " | other processes' CPU | row time |"
    )
    out.append("| --- " * (len(COLUMNS) + 3) + "|")
    for row in rows:
        if not row.available:
            out.append(
                f"| {row.label} | " + " | ".join(["—"] * len(COLUMNS)) + f" | {row.note} | |"
            )
            continue
        cells = [cell(row, c, local, offload) for c in COLUMNS]
        cpu = f"{row.foreign_cores:.2f} cores" if row.foreign_cores is not None else ""
        out.append(f"| {row.label} | " + " | ".join(cells) + f" | {cpu} | {row.seconds:.0f} s |")
    out += ["", *notes, ""]
    return "\n".join(out)


def plot(rows: list[Row], workload: Workload, path: Path) -> str | None:
    """Bar chart, one panel per column, whiskers min–max. None on success, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'); no PNG written"
    shown = [r for r in rows if r.available]
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4.2 * len(COLUMNS), 0.45 * len(shown) + 2))
    for ax, column in zip(axes, COLUMNS, strict=True):
        labels, mids, lows, highs = [], [], [], []
        for row in shown:
            values = row.values.get(column)
            if not values:
                continue
            mid = statistics.median(values)
            labels.append(row.label)
            mids.append(mid)
            lows.append(mid - min(values))
            highs.append(max(values) - mid)
        ys = list(range(len(labels)))[::-1]
        ax.barh(ys, mids, xerr=[lows, highs], color="tab:blue", alpha=0.8, capsize=2)
        ax.set_xlim(0, max(m + h for m, h in zip(mids, highs, strict=True)) * 1.25)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels if column == COLUMNS[0] else [], fontsize=8)
        ax.set_title(workload.title(column), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        for y, m, h in zip(ys, mids, highs, strict=True):
            ax.text(m + h, y, f" {_fmt(m)}", va="center", fontsize=7)
    fig.suptitle("SmolLM2-135M: local vs offloading vs swarm (median, whiskers min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def replot(json_path: Path) -> None:
    """Redraw the PNG beside a table's JSON (from the repository root):
    `python -m bench.table_report bench/results/table.json`."""
    import json

    data = json.loads(json_path.read_text())
    rows = [Row(**row) for row in data["rows"]]
    problem = plot(rows, Workload(**data["workload"]), json_path.with_suffix(".png"))
    print(problem or f"wrote {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    import sys

    replot(Path(sys.argv[1]))
