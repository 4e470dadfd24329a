"""Adversary suite (issue 6 section 2): every attack against a real loopback swarm.

    python bench/adversary_suite.py [--quick] [--out bench/results]

Runs, on the tiny test model (tests/tiny_model.py) for speed:

* output and weight tampering (noise 1/5/50 % of RMS, scaling, skipped block, another
  block's weights, 4-bit weights, cheating on 10 % of answers, only for never-seen or
  only for seen peers, replayed answers): detection by redundancy k=2 and k=3 and by
  the verifier, time to exclusion, wrong tokens in the client's output
  (trustswarm/testing/attack_output.py);
* protocol attacks: forged signature, statement for another request, DHT announcement
  in another peer's name, forged / expired / replayed reputation records, a record from
  an untrusted verifier, a Sybil flood of 10 identities, a false fraud report
  (bench/attack_protocol.py);
* false positives: honest float32 and bfloat16 servers under verifier checks and
  redundancy comparisons (trustswarm/testing/false_positives.py).

Writes bench/results/adversary.md and adversary.json. About 20 minutes on a loaded
2-core VM (--quick: about 6); `--render JSON` rewrites the .md from a .json.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="fewer attacks and shorter budgets")
    parser.add_argument("--verifier-timeout", type=float, default=40.0)
    parser.add_argument("--fp-seconds", type=float, default=150.0, help="false-positive budget")
    parser.add_argument("--only", default="", help="comma-separated attack name fragments")
    parser.add_argument("--skip-fp", action="store_true")
    parser.add_argument("--skip-protocol", action="store_true")
    parser.add_argument("--render", type=Path, help="only rewrite the .md from this .json")
    args = parser.parse_args(argv)
    if args.render:
        from adversary_report import render

        print(f"[adversary] wrote {render(args.render, args.out)}")
        return 0
    logging.basicConfig(level=logging.ERROR)
    logging.disable(logging.WARNING)  # libp2p and our own warnings about the attackers

    import adversary_report

    from trustswarm.testing import attack_protocol, false_positives
    from trustswarm.testing.attack_env import Env
    from trustswarm.testing.attack_output import ATTACKS, run_attack
    from trustswarm.testing.local_verifier import start_verifier, stop_verifier
    from trustswarm.testing.tiny_model import make_tiny_model_dir
    from trustswarm.verifier.daemon import VerifierConfig

    began = time.monotonic()
    attacks = ATTACKS
    if args.quick:
        attacks = [a for a in ATTACKS if a[1].kind in ("noise", "skip_block")][:3]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        attacks = [a for a in attacks if any(w in a[0] for w in wanted)]
    fp_seconds = args.fp_seconds / 3 if args.quick else args.fp_seconds
    tmp = Path(tempfile.mkdtemp(prefix="adversary-"))
    model_dir = make_tiny_model_dir(tmp)
    env = Env.start(model_dir, count=1)
    config = VerifierConfig()
    verifier = start_verifier(env.swarm, f"sqlite:///{tmp / 'verifier.db'}", config, seed=1)
    print(
        f"[adversary] tiny model swarm of {len(env.honest)} honest servers + a verifier up "
        f"in {time.monotonic() - began:.1f} s",
        flush=True,
    )
    rows, protocol = [], []
    fp = None
    clients = {k: env.client(k) for k in (1, 2, 3)}
    trusting = env.client(1, trusted_verifiers=[verifier.peer_id])
    try:
        for name, tamper in attacks:
            t = time.monotonic()
            row = run_attack(env, verifier, name, tamper, args.verifier_timeout, clients, trusting)
            rows.append(row)
            r = row.redundancy
            print(
                f"[adversary] {name}: k2 {r[2].detected} k3 {r[3].detected} verifier "
                f"{row.verifier.detected} ({row.verifier.seconds}) wrong k1 {r[1].wrong} k2 "
                f"{r[2].wrong} k3 {r[3].wrong} v {row.verifier.wrong} "
                f"[{time.monotonic() - t:.0f} s]",
                flush=True,
            )
        if not args.skip_protocol:
            steps = [
                lambda c: [
                    attack_protocol.signing_attack(
                        env, verifier, "forged_signature", c, args.verifier_timeout
                    )
                ],
                lambda c: [
                    attack_protocol.signing_attack(
                        env, verifier, "other_request", c, args.verifier_timeout
                    )
                ],
                lambda c: [attack_protocol.announcement_attack(env, verifier)],
                lambda c: attack_protocol.record_attacks(env, verifier),
                lambda c: [attack_protocol.sybil_flood(env, verifier)],
                lambda c: [attack_protocol.false_report(env, verifier)],
            ]
            if args.quick:
                steps = steps[:1] + steps[2:4] + steps[5:]
            client = clients[1]
            for step in steps:
                t = time.monotonic()
                for prow in step(client):
                    protocol.append(prow)
                    print(
                        f"[adversary] {prow.attack}: refused/harmless {prow.rejected} "
                        f"[{time.monotonic() - t:.0f} s]",
                        flush=True,
                    )
    finally:
        for model in [*clients.values(), trusting]:
            model.close()
        stop_verifier(env.swarm, verifier)
        env.close()
    if not args.skip_fp:
        t = time.monotonic()
        fp = false_positives.run(
            model_dir, f"sqlite:///{tmp / 'fp.db'}", fp_seconds / 2, fp_seconds / 2
        )
        print(
            f"[adversary] false positives: {fp.checks} checks, {fp.comparisons} comparisons, "
            f"penalised {len(fp.penalised)} [{time.monotonic() - t:.0f} s]",
            flush=True,
        )
    meta = {
        "command": "python bench/adversary_suite.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": time.monotonic() - began,
        "host": f"{platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end",
        "honest_per_span": 3,
        "new_tokens": env.prompts.new_tokens,
        "prompts": 1,
        "check_every": config.checks.check_every,
        "refresh_every": config.refresh_every,
        "verifier_timeout": args.verifier_timeout,
    }
    path = adversary_report.write(args.out, meta, rows, protocol, fp)
    print(f"[adversary] wrote {path} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
