"""`trustswarm reputation show`: one row per server, from a verifier's database or
from the records verifiers published in the swarm."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from trustswarm.protocol.errors import TrustswarmError

from .errors import ReputationError

if TYPE_CHECKING:
    from .rows import Row


def register(subparsers: argparse._SubParsersAction) -> None:
    rep = subparsers.add_parser("reputation", help="inspect server reputation")
    sub = rep.add_subparsers(dest="reputation_command", required=True)
    show = sub.add_parser(
        "show",
        help="print one row per server: peer id, state, score, checks passed/failed, last failure",
    )
    source = show.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", help="a verifier's database: SQLAlchemy URL or SQLite file path")
    source.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MULTIADDR",
        help="read the records verifiers published in the swarm (needs --verifier)",
    )
    show.add_argument(
        "--verifier",
        action="append",
        default=[],
        metavar="PEER_ID",
        help="with --initial-peers: a verifier whose records to read (repeatable)",
    )
    show.add_argument("--model-id", default=None, help="only this model")
    show.add_argument("--swarm-key", type=Path, default=None, help="private swarm key file")
    show.add_argument("--timeout", type=float, default=10.0, help="seconds per network step")
    show.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    # libp2p and SQLAlchemy only once the flags parse (`--help` stays instant).
    import trio

    from trustswarm.protocol.identity import parse_peer_id
    from trustswarm.protocol.transport import load_swarm_key, parse_peer_addr

    from .rows import rows_from_db, rows_from_swarm

    try:
        if args.db is not None:
            if args.verifier:
                raise ReputationError("--verifier goes with --initial-peers, not --db")
            rows = rows_from_db(args.db, args.model_id)
        else:
            if not args.verifier:
                raise ReputationError("--initial-peers needs at least one --verifier PEER_ID")
            for verifier in args.verifier:
                parse_peer_id(verifier)
            for text in args.initial_peers:
                parse_peer_addr(text)
            swarm_key = load_swarm_key(args.swarm_key) if args.swarm_key else None
            rows = trio.run(
                rows_from_swarm,
                args.initial_peers,
                args.verifier,
                args.model_id,
                swarm_key,
                args.timeout,
            )
    except TrustswarmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row), sort_keys=True))
    else:
        print(format_table(rows))
    return 0


def format_table(rows: list[Row]) -> str:
    if not rows:
        return "no servers recorded"
    with_verifier = any(r.verifier for r in rows)
    with_model = len({r.model_id for r in rows}) > 1
    header = ["PEER ID", "STATE", "SCORE", "PASSED", "FAILED", "LAST FAILURE"]
    if with_verifier:
        header.insert(1, "VERIFIER")
    if with_model:
        header.insert(1, "MODEL")
    lines = []
    for r in rows:
        score = "-" if r.score is None else f"{r.score:.3f}"
        cells = [r.peer_id, r.state, score, str(r.passes), str(r.failures), r.last_failure]
        if with_verifier:
            cells.insert(1, r.verifier)
        if with_model:
            cells.insert(1, r.model_id)
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    widths[-1] = 0  # the last column is not padded
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for cells in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(out)
