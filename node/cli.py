"""`trustswarm node start`: run a block server until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trustswarm.models.errors import ModelDirError
from trustswarm.protocol.errors import ProtocolError, TrustswarmError

from .config import ServerConfig

if TYPE_CHECKING:
    from .server import BlockServer

# torch, transformers and libp2p are imported where they are used, so `--help` and
# flag errors answer at once instead of after ~10 s of imports.
log = logging.getLogger("trustswarm.node")
DTYPE_NAMES = ("bfloat16", "float32")


def parse_span(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--blocks must look like START:END, got {text!r}"
        ) from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text!r}: need 0 <= START < END")
    return start, end


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_announce_addrs(texts: list[str], peer_id: str) -> tuple[str, ...]:
    """Multiaddrs to announce, without a /p2p/ part (one naming this peer is allowed)."""
    from trustswarm.protocol.transport import parse_multiaddr

    out = []
    for text in texts:
        addr, _, peer = str(parse_multiaddr(text)).partition("/p2p/")
        if peer and peer != peer_id:
            raise ProtocolError(f"--announce-addr {text!r} names another peer ({peer})")
        if "/tcp/" not in addr:
            raise ProtocolError(f"--announce-addr {text!r} has no /tcp/ port")
        out.append(addr)
    return tuple(dict.fromkeys(out))


def register(subparsers: argparse._SubParsersAction) -> None:
    node = subparsers.add_parser("node", help="run a block server")
    sub = node.add_subparsers(dest="node_command", required=True)
    start = sub.add_parser("start", help="serve a span of transformer blocks")
    start.add_argument(
        "--model", type=Path, required=True, help="model directory (see `model import`)"
    )
    start.add_argument(
        "--blocks",
        type=parse_span,
        default=None,
        help="span START:END to serve (default: the span the swarm covers worst)",
    )
    start.add_argument(
        "--num-blocks",
        type=positive_int,
        default=None,
        help="with no --blocks: how many blocks to serve (default: all)",
    )
    start.add_argument(
        "--identity",
        type=Path,
        required=True,
        help="Ed25519 key file; created if missing, so the peer id is stable",
    )
    start.add_argument(
        "--listen",
        action="append",
        default=None,
        help="multiaddr to listen on (repeatable; default /ip4/0.0.0.0/tcp/31330)",
    )
    start.add_argument(
        "--announce-addr",
        action="append",
        default=None,
        metavar="MULTIADDR",
        help="address to announce instead of the listen addresses (repeatable), e.g. a "
        "router's forwarded port /ip4/203.0.113.7/tcp/31330 or a relay",
    )
    peers = start.add_mutually_exclusive_group(required=True)
    peers.add_argument(
        "--initial-peers",
        nargs="+",
        default=None,
        metavar="MULTIADDR",
        help="full multiaddrs (…/p2p/<peer id>) of peers already in the swarm",
    )
    peers.add_argument("--new-swarm", action="store_true", help="start a new swarm")
    add_daemon_options(start)
    start.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    start.add_argument("--max-sessions", type=positive_int, default=ServerConfig.max_sessions)
    start.add_argument(
        "--max-session-tokens", type=positive_int, default=ServerConfig.max_session_tokens
    )
    start.add_argument("--max-batch", type=positive_int, default=ServerConfig.max_batch)
    start.add_argument(
        "--max-sessions-per-peer",
        type=positive_int,
        default=ServerConfig.max_sessions_per_peer,
        help="inference sessions one peer id may hold at once",
    )
    start.add_argument(
        "--kv-cache-mib",
        type=positive_int,
        default=ServerConfig.kv_cache_bytes // 2**20,
        help="KV-cache memory all sessions may reserve together (MiB; default 2048)",
    )
    start.add_argument(
        "--no-batching",
        dest="batch_steps",
        action="store_false",
        help="run every inference step alone instead of batching concurrent sessions' "
        "steps into one forward (float32 servers batch by default)",
    )
    start.set_defaults(func=run_start)


def add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """Options every long-running peer takes (node start, verifier start)."""
    parser.add_argument(
        "--swarm-key",
        type=Path,
        default=None,
        help="private swarm: file with a 64-hex-char pre-shared key",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="INFO",
    )


class _QuietLibp2p(logging.Filter):
    """Drops py-libp2p's multi-line "Failed to open stream" errors. Gossipsub logs one
    for every peer that does not speak it (every client), and our own stream failures
    are raised and reported by trustswarm with context."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to open stream to peer")


def configure_logging(level_name: str) -> None:
    """A daemon's logging (server, verifier, API, health page): timestamps on stderr,
    py-libp2p's connection chatter only at DEBUG."""
    level = logging.getLevelName(level_name)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level > logging.DEBUG:  # py-libp2p's INFO is connection chatter; DEBUG shows it all
        logging.getLogger("libp2p").setLevel(max(level, logging.WARNING))
        logging.getLogger("libp2p.host.basic_host").addFilter(_QuietLibp2p())


def configure_daemon(args: argparse.Namespace) -> None:
    configure_logging(args.log_level)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def run_start(args: argparse.Namespace) -> int:
    configure_daemon(args)
    import torch

    from trustswarm.models.store import ModelDir
    from trustswarm.protocol.identity import Identity
    from trustswarm.protocol.transport import load_swarm_key, parse_peer_addr

    from .server import BlockServer

    try:
        model_dir = ModelDir.open(args.model)
        if args.blocks and args.blocks[1] > model_dir.num_blocks:
            raise ModelDirError(
                f"--blocks {args.blocks[0]}:{args.blocks[1]} exceeds the model's "
                f"{model_dir.num_blocks} blocks"
            )
        identity = Identity.load_or_create(args.identity)
        swarm_key = load_swarm_key(args.swarm_key) if args.swarm_key else None
        initial = args.initial_peers or []
        for text in initial:
            parse_peer_addr(text)
        announce = parse_announce_addrs(args.announce_addr or [], str(identity.peer_id))
    except (TrustswarmError, ModelDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        max_sessions=args.max_sessions,
        max_session_tokens=args.max_session_tokens,
        max_batch=args.max_batch,
        max_sessions_per_peer=args.max_sessions_per_peer,
        kv_cache_bytes=args.kv_cache_mib * 2**20,
        batch_steps=args.batch_steps,
    )
    server = BlockServer(
        identity=identity,
        model_dir=model_dir,
        config=config,
        span=args.blocks,
        span_length=args.num_blocks,
        dtype=getattr(torch, args.dtype),
        swarm_key=swarm_key,
        announce_addrs=announce,
    )
    listen = args.listen or ["/ip4/0.0.0.0/tcp/31330"]
    return run_daemon(serve_block_server, server, listen, initial)


def run_daemon(main: Callable[..., Awaitable[None]], *args: object) -> int:
    """`trio.run(main, *args)` for a daemon CLI. Errors propagate to `trustswarm.cli.main`,
    which prints ours as one line, also from inside trio's exception groups."""
    try:
        trio.run(main, *args)
    except KeyboardInterrupt:
        pass
    return 0


async def serve_until_signal(
    serve: Callable[..., Awaitable[None]],
    listen: list[str],
    initial: list[str],
    started: Callable[[], None],
) -> None:
    """Run a peer's `serve(listen, initial, task_status=...)` until SIGINT/SIGTERM,
    printing its multiaddrs once it listens. Signals are caught before anything
    starts, so a SIGTERM during start-up also ends in a clean shutdown."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            addrs = await nursery.start(serve, listen, initial)
            for addr in addrs:
                print(addr, flush=True)
            started()


async def serve_block_server(server: BlockServer, listen: list[str], initial: list[str]) -> None:
    """Serve `server` until SIGINT/SIGTERM, logging what it serves once it listens."""

    def started() -> None:
        runner = server.runner
        log.info(
            "serving blocks %d:%d of %s as %s (%s, %.0f tokens/s)",
            runner.start,
            runner.end,
            server.model_id,
            server.identity.peer_id,
            runner.dtype,
            server.throughput,
        )

    await serve_until_signal(server.serve, listen, initial, started)
