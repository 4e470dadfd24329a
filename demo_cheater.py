"""DEMO ONLY: a block server that signs wrong answers, for `make demo`'s story.

Not part of `trustswarm node start` (no flag there can enable it). `python -m
trustswarm.demo_cheater --model DIR --blocks 0:30 --identity KEY --initial-peers ...`
runs a real BlockServer whose answers, on a `--fraction` of requests, get Gaussian
noise at `--amount` of each token's RMS just before they are signed. It also
announces `--boast` times its measured throughput, so routes prefer it. The
signatures and weights digest are valid: exactly what a verifier exists to catch.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio

from trustswarm.models.store import ModelDir
from trustswarm.node.cli import _serve_until_signal, parse_span
from trustswarm.node.config import ServerConfig
from trustswarm.node.handlers import ServingContext
from trustswarm.node.server import BlockServer
from trustswarm.protocol.codec import Message
from trustswarm.protocol.identity import Identity

log = logging.getLogger("trustswarm.demo_cheater")


@dataclass
class CheatingContext(ServingContext):
    fraction: float = 0.2
    amount: float = 0.05
    rng: random.Random = field(default_factory=random.Random)
    tampered: int = 0

    def signed_answer(  # type: ignore[override]
        self,
        kind: str,
        start: int,
        end: int,
        raw_request: bytes,
        output: torch.Tensor,
        name: str,
        peer: str,
        session_id: str = "",
        step: int = 0,
    ) -> Message:
        if self.rng.random() < self.fraction:
            x = output.float()
            rms = x.pow(2).mean(-1, keepdim=True).sqrt()
            output = (x + self.amount * rms * torch.randn_like(x)).to(output.dtype)
            self.tampered += 1
            log.warning("tampered answer #%d (%s to %s)", self.tampered, kind, peer[-8:])
        return super().signed_answer(
            kind, start, end, raw_request, output, name, peer, session_id, step
        )


@dataclass
class CheatingServer(BlockServer):
    fraction: float = 0.2
    amount: float = 0.05
    boast: float = 1.0

    def _make_context(self) -> ServingContext:
        self.throughput *= self.boast
        honest = super()._make_context()
        return CheatingContext(
            identity=honest.identity,
            runner=honest.runner,
            model_id=honest.model_id,
            span_digest=honest.span_digest,
            config=honest.config,
            info=honest.info,
            fraction=self.fraction,
            amount=self.amount,
        )


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    server = CheatingServer(
        identity=Identity.load_or_create(args.identity),
        model_dir=ModelDir.open(args.model),
        config=ServerConfig(),
        span=args.blocks,
        fraction=args.fraction,
        amount=args.amount,
        boast=args.boast,
    )
    try:
        trio.run(_serve_until_signal, server, [args.listen], args.initial_peers)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
