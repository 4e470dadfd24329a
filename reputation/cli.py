"""`trustswarm reputation show`: one row per server, from a verifier's database or
from the records verifiers published in the swarm."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import multiaddr
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from trustswarm.protocol.announcement import AnnouncementValidator
from trustswarm.protocol.errors import TrustswarmError
from trustswarm.protocol.identity import Identity, parse_peer_id
from trustswarm.protocol.info import call_info
from trustswarm.protocol.protocols import DHT_NAMESPACE
from trustswarm.protocol.transport import connect_peers, load_swarm_key, make_host, parse_peer_addr

from .errors import ReputationError
from .records import (
    REPUTATION_NAMESPACE,
    ReputationValidator,
    SignedReputationRecord,
    record_key,
)
from .store import ReputationStore, database_url

log = logging.getLogger("trustswarm.reputation")


@dataclass(frozen=True)
class Row:
    peer_id: str
    state: str
    score: float | None  # None: no record (from the swarm)
    passes: int
    failures: int
    last_failure: str
    model_id: str
    verifier: str = ""  # from the swarm: whose record this is


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


def rows_from_db(url: str, model_id: str | None) -> list[Row]:
    full = database_url(url)
    if full.startswith("sqlite:///") and full != "sqlite:///:memory:":
        path = Path(full.removeprefix("sqlite:///"))
        if not path.exists():
            raise ReputationError(f"no database at {path}")
    store = ReputationStore(full)
    try:
        return [
            Row(
                peer_id=r.peer_id,
                state=r.state,
                score=r.score,
                passes=r.passes,
                failures=r.failures,
                last_failure=_failure_text(r.last_failure, r.last_failure_at, r.ban_reason),
                model_id=r.model_id,
            )
            for r in store.all(model_id)
        ]
    finally:
        store.close()


async def rows_from_swarm(
    initial_peers: list[str],
    verifiers: list[str],
    model_id: str | None,
    swarm_key: str | None,
    timeout: float,
) -> list[Row]:
    """Learn the servers from the initial peers' info answers, then read each
    (verifier, server) record from the DHT, keeping only valid, unexpired ones."""
    host = make_host(Identity.generate(), swarm_key)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        dht = KadDHT(host, DHTMode.CLIENT)
        dht.register_validator(DHT_NAMESPACE, AnnouncementValidator())
        dht.register_validator(REPUTATION_NAMESPACE, ReputationValidator())
        async with background_trio_service(dht):
            await connect_peers(host, dht, initial_peers, timeout)
            servers: dict[str, str] = {}  # peer id -> model id
            for text in initial_peers:
                info = parse_peer_addr(text)
                try:
                    with trio.fail_after(timeout):
                        await host.connect(PeerInfo(info.peer_id, info.addrs))
                    answer = await call_info(host, info.peer_id, timeout)
                except Exception as exc:
                    log.warning("peer %s gave no info: %s", info.peer_id, exc)
                    continue
                for signed in [answer.announcement, *answer.known]:
                    ann = signed.announcement
                    if model_id is None or ann.model_id == model_id:
                        servers[ann.peer_id] = ann.model_id
            rows = []
            for peer, model in sorted(servers.items()):
                for verifier in verifiers:
                    signed = await _fetch(dht, record_key(verifier, peer, model), timeout)
                    if signed is None:
                        rows.append(Row(peer, "unknown", None, 0, 0, "-", model, verifier))
                        continue
                    r = signed.record
                    rows.append(
                        Row(peer, r.state, r.score, r.passes, r.failures, "-", model, verifier)
                    )
            return rows


async def _fetch(dht: KadDHT, key: str, timeout: float) -> SignedReputationRecord | None:
    with trio.move_on_after(timeout):
        try:
            value = await dht.get_value(key)
            if value is None:
                return None
            signed = SignedReputationRecord.from_bytes(value)
            signed.verify()
            return signed
        except Exception as exc:
            log.debug("no valid record under %s: %s", key, exc)
    return None


def _failure_text(detail: str | None, at: float | None, ban_reason: str | None) -> str:
    parts = []
    if ban_reason:
        parts.append(f"BANNED: {ban_reason}")
    if detail:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at)) if at is not None else "?"
        parts.append(f"{when} {detail}")
    return "; ".join(parts) or "-"


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
