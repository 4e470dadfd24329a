"""The health page as server-rendered HTML: a little CSS, no script, no build step.

Everything that reaches the page passes through `esc` (peer ids, model ids, addresses,
reasons, error texts: announcements and errors come from peers, and any of them may
be hostile), and every number through `number` (NaN, infinities and 1e308 print as
text, never break the layout).
"""

from __future__ import annotations

import html
import math
import time

from .state import BROKEN, ModelHealth, ServerRow, SwarmSnapshot, VerifierRecord

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem;color:#1d2330;background:#f6f7f9}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:0}
.meta{color:#5b6475;font-size:.85rem;margin-bottom:1rem}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:1rem;margin-bottom:1.2rem}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:4px;font-size:.8rem;font-weight:600}
.healthy,.ok{background:#d9f5e1;color:#146c2e}.broken,.banned{background:#fde0e0;color:#a21b1b}
.probation,.unverified{background:#fff1cc;color:#7a5600}
.blocks{display:flex;gap:1px;margin:.6rem 0 .2rem;height:18px}
.blocks div{flex:1;min-width:1px}.c0{background:#e04848}.c1{background:#f0c24b}.c2{background:#3aa757}
table{border-collapse:collapse;width:100%;font-size:.85rem}
th,td{text-align:left;padding:.35rem .5rem;border-top:1px solid #eceef2;vertical-align:top}
th{color:#5b6475;font-weight:600;border-top:none}
.span{position:relative;height:12px;background:#eceef2;border-radius:3px;min-width:120px}
.span div{position:absolute;top:0;bottom:0;background:#4c7bd9;border-radius:3px}
tr.banned td{background:#fff6f6}.mono{font-family:ui-monospace,Menlo,monospace}
.reason{color:#a21b1b;max-width:28rem;overflow-wrap:anywhere}.muted{color:#8a93a3}
.error{color:#a21b1b}.boasting{background:#fde0e0;color:#a21b1b}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def number(value: float | int | None, digits: int = 3) -> str:
    """A number for people: '—' when unknown, NaN / ±∞ spelled out, 3 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    try:
        return f"{value:.{digits}g}"
    except OverflowError:  # an int beyond any float
        return "> 1e308" if value > 0 else "< -1e308"


def as_float(value: float | int) -> float:
    """A float for arithmetic; ints beyond any float become ±inf."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def seconds_ago(then: float, now: float) -> str:
    age = as_float(now) - as_float(then)
    if not math.isfinite(age):
        return "—"
    if age < 0:
        return "in the future"
    if age < 120:
        return f"{age:.0f} s ago"
    if age < 7200:
        return f"{age / 60:.0f} min ago"
    return f"{age / 3600:.3g} h ago"


def short_id(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 14 else f"{peer_id[:4]}…{peer_id[-6:]}"


def _fraction(value: int, total: int) -> float:
    if total <= 0:
        return 0.0
    return min(100.0, max(0.0, 100.0 * value / total))


def span_bar(row: ServerRow, num_blocks: int) -> str:
    left = _fraction(row.start, num_blocks)
    width = max(0.0, _fraction(row.end, num_blocks) - left)
    return (
        f'<div class="span" title="blocks {esc(row.start)}:{esc(row.end)}">'
        f'<div style="left:{left:.2f}%;width:{width:.2f}%"></div></div>'
    )


def block_strip(model: ModelHealth) -> str:
    cells = []
    for block, (usable, established) in enumerate(
        zip(model.coverage, model.established, strict=True)
    ):
        level = 0 if usable == 0 else (2 if established else 1)
        title = f"block {block}: {usable} server(s), {established} established"
        cells.append(f'<div class="c{level}" title="{esc(title)}"></div>')
    return f'<div class="blocks">{"".join(cells)}</div>'


def verifier_cell(records: tuple[VerifierRecord, ...], verifier_id: str, now: float) -> str:
    record = next((r for r in records if r.verifier_id == verifier_id), None)
    if record is None:
        return '<td class="muted">no record</td>'
    checked = [
        f"{label} {seconds_ago(at, now)}"
        for label, at in (("check", record.last_check_at), ("audit", record.last_audit_at))
        if at is not None
    ]
    reason = f'<div class="reason">{esc(record.ban_reason)}</div>' if record.ban_reason else ""
    return (
        f'<td><span class="badge {esc(record.state)}">{esc(record.state)}</span> '
        f'{esc(number(record.score, 2))}{reason}<br><span class="muted">'
        f"{esc(record.passes)} passed, {esc(record.failures)} failed · "
        f"signed {esc(seconds_ago(record.issued_at, now))}"
        + "".join(f"<br>last {esc(text)}" for text in checked)
        + "</span></td>"
    )


def measured_cell(row: ServerRow, now: float) -> str:
    """Our own measurement: tokens/s with its age, the error of a failed one, and a
    badge when the server announces far more than we measure."""
    if row.measure_error is not None:
        return f'<td class="error" title="{esc(row.measure_error)}">failed</td>'
    if row.measured_throughput is None:
        return '<td class="muted">—</td>'
    when = "" if row.measured_at is None else seconds_ago(row.measured_at, now)
    badge = ' <span class="badge boasting">boasting</span>' if row.boasting else ""
    return f'<td title="measured {esc(when)}">{esc(number(row.measured_throughput))}{badge}</td>'


def server_tr(row: ServerRow, model: ModelHealth, verifiers: tuple[str, ...], now: float) -> str:
    rtt = None if row.rtt is None else as_float(row.rtt) * 1000.0
    reason = f'<div class="reason">{esc(row.ban_reason)}</div>' if row.ban_reason else ""
    cells = [
        f'<td class="mono" title="{esc(row.peer_id)}">{esc(short_id(row.peer_id))}</td>',
        f"<td>{span_bar(row, model.num_blocks)}</td>",
        f'<td class="mono">{esc(row.start)}:{esc(row.end)}</td>',
        f"<td>{esc(row.dtype)}</td>",
        f"<td>{esc(number(row.throughput))}</td>",
        measured_cell(row, now),
        f"<td>{esc(number(rtt))}</td>",
        f"<td>{esc(number(row.active_sessions))}</td>",
        f'<td><span class="badge {esc(row.state)}">{esc(row.state)}</span>{reason}</td>',
        f"<td>{esc(number(row.score, 2))}</td>",
        *(verifier_cell(row.records, v, now) for v in verifiers),
    ]
    css = ' class="banned"' if row.banned else ""
    return f'<tr{css} data-peer="{esc(row.peer_id)}">{"".join(cells)}</tr>'


def model_section(model: ModelHealth, verifiers: tuple[str, ...], now: float) -> str:
    ok_servers = sum(not r.banned for r in model.servers)
    least = min(model.established, default=0)
    summary = (
        f"{model.num_blocks} blocks · {len(model.servers)} servers ({ok_servers} usable) · "
        f"every block served by at least {least} established server(s)"
    )
    notes = []
    if model.status == BROKEN and model.uncovered:
        notes.append(f"blocks without a server: {_ranges(model.uncovered)}")
    if model.digest_conflicts:
        notes.append("spans announced with different weights: " + ", ".join(model.digest_conflicts))
    if model.error:
        notes.append(f"discovery: {model.error}")
    heads = [
        "Server",
        "Span",
        "Blocks",
        "dtype",
        "Announced tok/s",
        "Measured tok/s",
        "RTT ms",
        "Sessions",
        "State",
        "Score",
    ] + [f"Verifier {short_id(v)}" for v in verifiers]
    return (
        f'<section data-model="{esc(model.model_id)}"><h2>{esc(model.model_id)} '
        f'<span class="badge {esc(model.status)}">{esc(model.status)}</span></h2>'
        f'<div class="meta">{esc(summary)}</div>{block_strip(model)}'
        + "".join(f'<div class="error">{esc(n)}</div>' for n in notes)
        + "<table><thead><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in heads)
        + "</tr></thead><tbody>"
        + "".join(server_tr(r, model, verifiers, now) for r in model.servers)
        + "</tbody></table></section>"
    )


def _ranges(blocks: list[int]) -> str:
    parts, start = [], None
    for i, block in enumerate(blocks):
        if start is None:
            start = block
        if i + 1 == len(blocks) or blocks[i + 1] != block + 1:
            parts.append(str(start) if start == block else f"{start}-{block}")
            start = None
    return ", ".join(parts)


def render_page(snapshot: SwarmSnapshot, now: float | None = None) -> str:
    now = time.time() if now is None else now
    refresh = as_float(snapshot.refresh_seconds)
    refresh_text = str(max(1, min(3600, round(refresh)))) if math.isfinite(refresh) else "30"
    verifiers = snapshot.trusted_verifiers
    trust = (
        "trusted verifiers: " + ", ".join(verifiers)
        if verifiers
        else "no trusted verifier: reputation not shown"
    )
    body = "".join(model_section(m, verifiers, now) for m in snapshot.models)
    if not snapshot.models:
        body = f'<section class="error">{esc(snapshot.error or "no model found yet")}</section>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{refresh_text}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>trustswarm health</title><style>{CSS}</style></head><body>"
        "<h1>trustswarm swarm health</h1>"
        f'<div class="meta">updated {esc(seconds_ago(snapshot.taken_at, now))} · '
        f'{esc(trust)} · <a href="/api/v1/state">JSON</a> · '
        '<a href="/metrics">metrics</a></div>'
        f"{body}</body></html>"
    )
