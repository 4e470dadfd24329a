"""The `trustswarm` command line: `model`, `node`, `verifier`, `reputation`, `health`."""

from __future__ import annotations

import argparse
import sys

from trustswarm.api import cli as api_cli
from trustswarm.health import cli as health_cli
from trustswarm.models import cli as model_cli
from trustswarm.node import cli as node_cli
from trustswarm.protocol.errors import TrustswarmError, trustswarm_error_in
from trustswarm.reputation import cli as reputation_cli
from trustswarm.verifier import cli as verifier_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trustswarm",
        description="Run a language model across a swarm of untrusted machines.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    api_cli.register(sub)
    health_cli.register(sub)
    model_cli.register(sub)
    node_cli.register(sub)
    reputation_cli.register(sub)
    verifier_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (TrustswarmError, BaseExceptionGroup) as exc:  # a group: from a trio nursery
        error = trustswarm_error_in(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
