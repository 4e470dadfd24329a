"""`trustswarm verifier start`: run a verifier daemon until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from trustswarm.models.errors import ModelDirError
from trustswarm.node.cli import (
    add_daemon_options,
    configure_daemon,
    run_daemon,
    serve_until_signal,
)
from trustswarm.protocol.errors import TrustswarmError

from .config import AuditConfig, CheckConfig, VerifierConfig

if TYPE_CHECKING:
    from .daemon import Verifier

log = logging.getLogger("trustswarm.verifier")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    verifier = subparsers.add_parser("verifier", help="run a verifier daemon")
    sub = verifier.add_subparsers(dest="verifier_command", required=True)
    start = sub.add_parser(
        "start", help="spot-check servers, judge fraud reports, publish signed reputation"
    )
    start.add_argument(
        "--model", type=Path, required=True, help="model directory with the reference weights"
    )
    start.add_argument(
        "--identity",
        type=Path,
        required=True,
        help="Ed25519 key file; created if missing. Clients trust this peer id",
    )
    start.add_argument(
        "--db",
        default="sqlite:///verifier.db",
        help="SQLAlchemy URL of the reputation store (default sqlite:///verifier.db)",
    )
    start.add_argument(
        "--initial-peers",
        nargs="+",
        required=True,
        metavar="MULTIADDR",
        help="full multiaddrs (…/p2p/<peer id>) of peers already in the swarm",
    )
    start.add_argument(
        "--listen",
        action="append",
        default=None,
        help="multiaddr to listen on (repeatable; default /ip4/0.0.0.0/tcp/31340)",
    )
    start.add_argument(
        "--check-every",
        type=positive_float,
        default=CheckConfig.check_every,
        metavar="SECONDS",
        help=f"mean seconds between spot-checks, random timing (default {CheckConfig.check_every})",
    )
    start.add_argument(
        "--record-ttl",
        type=positive_float,
        default=VerifierConfig.record_ttl,
        metavar="SECONDS",
        help=f"how long a signed record stays valid (default {VerifierConfig.record_ttl:.0f})",
    )
    start.add_argument(
        "--republish-every",
        type=positive_float,
        default=VerifierConfig.republish_every,
        metavar="SECONDS",
        help=f"re-publish every record this often (default {VerifierConfig.republish_every:.0f})",
    )
    start.add_argument(
        "--audit-share",
        type=share,
        default=AuditConfig.compute_share,
        metavar="FRACTION",
        help="at most this share of the time judging client audits "
        f"(default {AuditConfig.compute_share})",
    )
    start.add_argument(
        "--audits-per-minute",
        type=count,
        default=AuditConfig.max_per_window,
        metavar="N",
        help="client audits accepted per client peer id per minute; 0 refuses all "
        f"(default {AuditConfig.max_per_window})",
    )
    add_daemon_options(start)
    start.set_defaults(func=run_start)


def run_start(args: argparse.Namespace) -> int:
    configure_daemon(args)
    # Heavy imports (torch, transformers, libp2p, SQLAlchemy) only once the flags parse.
    from trustswarm.models.store import ModelDir
    from trustswarm.protocol.identity import Identity
    from trustswarm.protocol.transport import load_swarm_key, parse_multiaddr, parse_peer_addr
    from trustswarm.reputation.store import ReputationStore

    from .daemon import Verifier

    try:
        model_dir = ModelDir.open(args.model)
        identity = Identity.load_or_create(args.identity)
        swarm_key = load_swarm_key(args.swarm_key) if args.swarm_key else None
        for text in args.initial_peers:
            parse_peer_addr(text)
        listen = args.listen or ["/ip4/0.0.0.0/tcp/31340"]
        for text in listen:
            parse_multiaddr(text)
        store = ReputationStore(args.db)
    except (TrustswarmError, ModelDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = VerifierConfig(
        checks=CheckConfig(check_every=args.check_every),
        record_ttl=args.record_ttl,
        republish_every=args.republish_every,
        audits=AuditConfig(max_per_window=args.audits_per_minute, compute_share=args.audit_share),
    )
    verifier = Verifier(
        identity=identity, model_dir=model_dir, store=store, config=config, swarm_key=swarm_key
    )
    try:
        return run_daemon(_serve_until_signal, verifier, listen, args.initial_peers)
    finally:
        store.close()


async def _serve_until_signal(verifier: Verifier, listen: list[str], initial: list[str]) -> None:
    def started() -> None:
        log.info(
            "verifier %s checking %s (%d blocks), store %s",
            verifier.peer_id,
            verifier.model_id,
            verifier.model_dir.num_blocks,
            verifier.store.url,
        )

    await serve_until_signal(verifier.serve, listen, initial, started)
