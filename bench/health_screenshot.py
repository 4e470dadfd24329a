"""The README's health page screenshot: bench/results/health.png.

A loopback swarm of the real SmolLM2-135M-Instruct (30 blocks; imported once into
~/.cache/trustswarm like `make demo`): five honest servers (one in bfloat16), one that
tampers with every answer, a real verifier that spot-checks them all, and the health
page under uvicorn, photographed by the system's headless chromium once the verifier
has banned the cheater and established honest servers (or after --timeout seconds).

    .venv/bin/python bench/health_screenshot.py [--out bench/results/health.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from trustswarm.demo import DEFAULT_MODEL_DIR, ensure_model
from trustswarm.reputation.score import OK
from trustswarm.testing.health_env import headless_chromium, serve_web, start_cheated_swarm

HONEST = [(0, 15), (15, 30), (0, 10), (10, 30)]
BF16 = (5, 20)
CHEAT = (0, 30)


def settled(env, want_ok: int) -> bool:  # noqa: ANN001 - a CheatedSwarm
    snapshot = env.collector.latest
    if snapshot is None or not snapshot.models:
        return False
    rows = {r.peer_id: r for r in snapshot.models[0].servers}
    cheat = rows.get(env.cheat.peer_id)
    ok = sum(r.state == OK for r in rows.values())
    return len(rows) == len(HONEST) + 2 and cheat is not None and cheat.banned and ok >= want_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "health.png"
    )
    parser.add_argument("--timeout", type=float, default=240.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ensure_model(DEFAULT_MODEL_DIR)
    driver = headless_chromium(width=1500, height=900)
    with tempfile.TemporaryDirectory() as tmp:
        env = start_cheated_swarm(
            DEFAULT_MODEL_DIR, f"sqlite:///{Path(tmp) / 'v.db'}", HONEST, CHEAT, refresh=3.0
        )
        try:
            env.extra.append(env.swarm.start_server(BF16, dtype=torch.bfloat16))
            began = time.monotonic()
            while not settled(env, want_ok=len(HONEST)):
                if time.monotonic() - began > args.timeout:
                    print("timed out waiting for the verifier; photographing as is")
                    break
                time.sleep(1.0)
            time.sleep(4.0)  # a fresh snapshot with every RTT measured
            env.web = serve_web(lambda: env.collector.latest)
            driver.get(env.web.url)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1500, int(height) + 40)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(f"wrote {args.out} after {time.monotonic() - began:.0f} s")
        finally:
            driver.quit()
            env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
