"""The report of `bench/generation.py --profile`: ms per decode / prefill step on the
client and on each server, from the tallies of trustswarm.testing.step_profile (which
patches the processes; see there for what each category covers)."""

from __future__ import annotations

import functools

from trustswarm.testing.step_profile import DECODE, PREFILL, Tally

# -- report ---------------------------------------------------------------------------

CLIENT_ROWS = (
    "embedding",
    "LM head (norm + lm_head)",
    "codec encode",
    "codec decode",
    "ed25519 verify",
    "digests + chain links",
    "stream writes",
    "waiting for answers (reads)",
)
TRUST_ROWS = ("ed25519 sign", "ed25519 verify", "digests + chain links")
LOCAL_ROWS = ("embedding", "LM head (norm + lm_head)")  # outside the session's loop
SERVER_ROWS = (
    "codec decode",
    "codec encode",
    "digests + chain links",
    "ed25519 sign",
    "ed25519 verify",
    "stream writes",
)


def _blocks(tally: Tally, kind: str) -> list[str]:
    names = [c for c in tally.seconds.get(kind, {}) if c.startswith("block ")]
    return sorted(names, key=lambda c: int(c.split()[1]))


def server_lines(
    tally: Tally, kind: str, steps: int
) -> tuple[list[tuple[str, float | None]], float]:
    """(label, ms per step) rows of one server and the server's total work per step."""
    ms = functools.partial(tally.ms, kind, per=steps)
    blocks = [ms(c) for c in _blocks(tally, kind)]
    runner, call, run = ms("runner"), ms("runner call"), ms("thread hop + run")
    rows = [(name, ms(name)) for name in SERVER_ROWS]
    rows += [
        ("thread hop (run - runner call)", max(run - call, 0.0)),
        ("runner: validation, positions (call - run)", max(call - runner, 0.0)),
        ("runner: mask + rotary + glue (run - blocks)", max(runner - sum(blocks), 0.0)),
        (f"blocks, sum of {len(blocks)}", sum(blocks)),
    ]
    if blocks:
        rows.append((f"  per block: min {min(blocks):.3f} / max {max(blocks):.3f}", None))
    work = sum(v for _, v in rows[: len(SERVER_ROWS)]) + max(run, call)
    return rows, work


def print_profile(client: Tally, servers: list[tuple[str, Tally]]) -> dict:
    """Print ms per step (decode and prefill) on the client and every server; return the
    same numbers as a dict for --json."""
    out: dict = {}
    print("\n=== profile: ms per step, mean (instrumented run: absolute times are inflated) ===")
    for kind in (DECODE, PREFILL):
        steps = client.calls.get(kind, {}).get("steps", 0)
        walls = client.calls.get(kind, {}).get("TOTAL wall", 0)
        if not steps:
            continue
        print(f"\n--- {kind}: {steps} steps ({walls} with a wall time) ---")
        rows = [(name, client.ms(kind, name, steps)) for name in CLIENT_ROWS]
        wall = client.ms(kind, "TOTAL wall", walls)
        remote = client.ms(kind, "remote step (loop.run)", steps)
        local = sum(v for name, v in rows if name in LOCAL_ROWS)
        inside = sum(v for name, v in rows if name not in LOCAL_ROWS)
        rows += [
            ("sync->trio bridge + session bookkeeping", max(remote - inside, 0.0)),
            ("generate loop, sampling, history (HF side)", max(wall - local - remote, 0.0)),
            ("TOTAL wall per step", wall),
        ]
        print("client")
        for label, value in rows:
            print(f"  {label:<50}{value:9.3f}")
        section = {"client": dict(rows), "servers": {}}
        server_work = 0.0
        for name, tally in servers:
            lines, work = server_lines(tally, kind, steps)
            server_work += work
            print(f"{name}  (work {work:.3f})")
            for label, value in lines:
                print(f"  {label}" if value is None else f"  {label:<50}{value:9.3f}")
            section["servers"][name] = {k: v for k, v in lines if v is not None} | {"work": work}
        waiting = client.ms(kind, "waiting for answers (reads)", steps)
        transit = waiting - server_work
        print(f"{'client waiting - servers work (network, scheduling)':<52}{transit:9.3f}")
        print("  (negative: servers' work overlaps, e.g. a chained hop forwards while answering)")
        section["network_and_scheduling"] = transit
        trust = sum(client.ms(kind, c, steps) for c in TRUST_ROWS) + sum(
            tally.ms(kind, c, steps) for _, tally in servers for c in TRUST_ROWS
        )
        share = trust / wall if wall else 0.0
        print(
            f"{'signing + checks (ed25519, digests, chain links), all':<52}{trust:9.3f}"
            f"  = {100 * share:.1f} % of the wall (goal <= 2 %; sequential upper bound)"
        )
        section["signing_and_checks"] = {"ms": trust, "share_of_wall": share}
        out[kind] = section
    return out
