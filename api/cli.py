"""`trustswarm api`: serve the OpenAI-compatible API until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trustswarm.node.cli import configure_logging, positive_int

log = logging.getLogger("trustswarm.api")
DEFAULT_LISTEN = "127.0.0.1:8000"


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    api = subparsers.add_parser(
        "api", help="serve an OpenAI-compatible HTTP API (chat and text completions)"
    )
    api.add_argument("--model", type=Path, required=True, help="model directory (with tokenizer)")
    api.add_argument(
        "--initial-peers",
        nargs="+",
        required=True,
        metavar="MULTIADDR",
        help="full multiaddrs (…/p2p/<peer id>) of peers already in the swarm",
    )
    api.add_argument(
        "--redundancy",
        type=positive_int,
        default=1,
        help="servers that compute every span, compared (default 1)",
    )
    api.add_argument(
        "--trusted-verifier",
        action="append",
        default=[],
        metavar="ADDR",
        help="peer id or multiaddr of a verifier whose records count (repeatable)",
    )
    api.add_argument(
        "--audit-rate",
        type=_rate,
        default=None,
        help="share of exchanges sent to the verifiers for audits (default 0.03)",
    )
    api.add_argument("--dtype-policy", choices=["any", "float32"], default="any")
    api.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address of the API (default {DEFAULT_LISTEN})",
    )
    api.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=8,
        help="inference sessions at once; more requests wait (default 8)",
    )
    api.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        default=4096,
        help="largest max_tokens a request may ask (default 4096)",
    )
    api.add_argument(
        "--swarm-key",
        type=Path,
        default=None,
        help="private swarm: file with a 64-hex-char pre-shared key",
    )
    api.add_argument(
        "--log-level", type=str.upper, default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    api.set_defaults(func=run_api)


def run_api(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    import uvicorn
    from transformers import AutoTokenizer

    from trustswarm.client import DistributedModelForCausalLM
    from trustswarm.client.audits import DEFAULT_AUDIT_RATE
    from trustswarm.health.cli import bind, server_class
    from trustswarm.health.errors import HealthError
    from trustswarm.protocol.transport import load_swarm_key

    from .app import Served, api_app
    from .schemas import Limits

    try:
        sock = bind(args.listen)
    except HealthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = DistributedModelForCausalLM.from_pretrained(
        args.model,
        args.initial_peers,
        swarm_key=load_swarm_key(args.swarm_key) if args.swarm_key else None,
        trusted_verifiers=args.trusted_verifier,
        redundancy=args.redundancy,
        dtype_policy=args.dtype_policy,
        audit_rate=DEFAULT_AUDIT_RATE if args.audit_rate is None else args.audit_rate,
    )
    try:
        limits = Limits(
            max_tokens_limit=args.max_tokens_limit,
            max_tokens_default=min(256, args.max_tokens_limit),
            vocab_size=int(model.config.vocab_size),
        )
        served = Served(model, tokenizer, limits, max_concurrent=args.max_concurrent)
        host, port = sock.getsockname()[:2]
        print(f"http://{host}:{port}/v1", flush=True)
        config = uvicorn.Config(api_app(served), log_level="warning")
        server_class()(config).run(sockets=[sock])  # returns on Ctrl-C / SIGTERM
    finally:
        model.close()
        sock.close()
        log.info("closed")
    return 0
