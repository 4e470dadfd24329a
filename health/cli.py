"""`trustswarm health`: serve the swarm health page until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path
from types import FrameType

from trustswarm.node.cli import configure_logging

from .errors import HealthError

log = logging.getLogger("trustswarm.health")
DEFAULT_LISTEN = "127.0.0.1:8001"


def parse_listen(text: str) -> tuple[str, int]:
    """host:port, or [v6 address]:port. Raises HealthError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise HealthError(f"--listen must be host:port, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise HealthError(f"--listen port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise HealthError(f"--listen port must lie in 0-65535, got {port}")
    return host, port


def bind(listen: str) -> socket.socket:
    """A listening TCP socket for `listen` (port 0: any free port). Raises HealthError."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise HealthError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    return sock


def refresh_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected 1 to 3600 seconds, got {text!r}")
    return value


def measure_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 10 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected 10 to 86400 seconds, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    health = subparsers.add_parser(
        "health", help="serve a web page on the swarm's health and the servers' reputation"
    )
    health.add_argument(
        "--initial-peers",
        nargs="+",
        required=True,
        metavar="MULTIADDR",
        help="full multiaddrs (…/p2p/<peer id>) of peers already in the swarm",
    )
    health.add_argument(
        "--trusted-verifier",
        action="append",
        default=[],
        metavar="ADDR",
        help="peer id or multiaddr of a verifier whose records to show (repeatable)",
    )
    health.add_argument(
        "--model-id",
        action="append",
        default=[],
        metavar="ID",
        help="model to show (repeatable; default: every model the initial peers announce)",
    )
    health.add_argument(
        "--model",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="model directory (or its manifest.json) of a model to watch: its block count, "
        "and the hidden size to measure its servers' throughput with (repeatable)",
    )
    health.add_argument(
        "--measure-every",
        type=measure_seconds,
        default=300.0,  # MeasureConfig's (not imported here: it imports torch)
        metavar="SECONDS",
        help="seconds between two timed forward requests to one server of a --model "
        "(default %(default)g; 16 tokens each, one request at a time)",
    )
    health.add_argument(
        "--no-measure",
        action="store_true",
        help="do not send timed requests: show announced throughput only",
    )
    health.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address of the web page (default {DEFAULT_LISTEN})",
    )
    health.add_argument(
        "--refresh",
        type=refresh_seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds between swarm refreshes, and the page's own reload (default 30)",
    )
    health.add_argument(
        "--swarm-key",
        type=Path,
        default=None,
        help="private swarm: file with a 64-hex-char pre-shared key",
    )
    health.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="INFO",
    )
    health.set_defaults(func=run_health)


def server_class():  # noqa: ANN201 - a uvicorn.Server subclass (uvicorn imported late)
    import uvicorn

    class Server(uvicorn.Server):
        """Ctrl-C / SIGTERM end the server (page or API) cleanly with exit status 0 (uvicorn itself
        re-raises the signal after its shutdown, so the cleanup after it never ran)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.force_exit = self.should_exit  # a second Ctrl-C does not wait
            self.should_exit = True

    return Server


def run_health(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    import uvicorn

    from trustswarm.protocol.transport import load_swarm_key

    from .app import health_app
    from .collect import HealthCollector, load_manifest
    from .measure import MeasureConfig

    try:
        collector = HealthCollector(
            initial_peers=args.initial_peers,
            trusted_verifiers=args.trusted_verifier,
            model_ids=args.model_id,
            refresh=args.refresh,
            swarm_key=load_swarm_key(args.swarm_key) if args.swarm_key else None,
            manifests=[load_manifest(path) for path in args.model],
            measure=MeasureConfig(enabled=not args.no_measure, every=args.measure_every),
        )
        sock = bind(args.listen)
    except HealthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    collector.start()
    host, port = sock.getsockname()[:2]
    print(f"http://{host}:{port}/", flush=True)
    config = uvicorn.Config(health_app(lambda: collector.latest), log_level="warning")
    try:
        server_class()(config).run(sockets=[sock])  # returns on Ctrl-C / SIGTERM
    finally:
        collector.close()
        sock.close()
    return 0
