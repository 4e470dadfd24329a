"""DEMO ONLY: a block server that signs wrong answers, for `make demo`'s story.

Not part of `trustswarm node start` (no flag there can enable it). `python -m
trustswarm.demo_cheater --model DIR --blocks 0:30 --identity KEY --initial-peers ...`
runs a real BlockServer whose answers, on a `--fraction` of requests, get Gaussian
noise at `--amount` of each token's RMS just before they are signed. It also
announces `--boast` times its measured throughput, so routes prefer it. The
signatures and weights digest are valid: exactly what a verifier exists to catch.

With `--recognise SIGNAL` it is instead one of trustswarm.testing.recognising's cheaters:
honest unless SIGNAL fires for the asking peer (e.g. `late_step`: inference steps >= 7),
then a skipped-block answer; `rare` skips on a random `--fraction` of answers. With
`--victim PEER_ID` it skips a block only for that peer: no spot-check can see it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import trio

from trustswarm.models.store import ModelDir
from trustswarm.node.cli import parse_span, serve_block_server
from trustswarm.node.config import ServerConfig
from trustswarm.protocol.identity import Identity
from trustswarm.testing.adversary import Tamper, adversarial_server_cls
from trustswarm.testing.recognising import RECOGNISING, rare_cheater, targeting_cheater

log = logging.getLogger("trustswarm.demo_cheater")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--blocks", type=parse_span, required=True)
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--amount", type=float, default=0.05)
    parser.add_argument("--boast", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recognise", choices=sorted(RECOGNISING), default=None)
    parser.add_argument(
        "--victim", action="append", default=[], help="cheat only for this peer id (repeatable)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    server = cheater_cls(args)(
        identity=Identity.load_or_create(args.identity),
        model_dir=ModelDir.open(args.model),
        config=ServerConfig(),
        span=args.blocks,
    )
    try:
        trio.run(serve_block_server, server, [args.listen], args.initial_peers)
    except KeyboardInterrupt:
        pass
    return 0


def cheater_cls(args: argparse.Namespace) -> type:
    if args.victim:
        return targeting_cheater(args.victim, boast=args.boast)
    if args.recognise == "rare":
        return rare_cheater(args.fraction)
    if args.recognise is not None:
        return RECOGNISING[args.recognise]()
    return adversarial_server_cls(
        Tamper("noise", amount=args.amount, fraction=args.fraction), boast=args.boast
    )


if __name__ == "__main__":
    sys.exit(main())
