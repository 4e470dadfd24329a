"""Daemon start-up errors a user meets first: one clear line, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import multiaddr
import pytest

from tests.daemons import PY
from trustswarm.protocol.errors import SwarmError, trustswarm_error_in
from trustswarm.protocol.transport import refuse_shared_port

pytestmark = pytest.mark.timeout(120)
UNREACHABLE = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQt58WyNGZLHmtw5YsN3Jy3SGTfUU7yUuJvTXZ8hfq7Qf"


def reuseport_listener() -> socket.socket:
    """A listener like py-libp2p's: SO_REUSEPORT, so a careless second bind would share it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_busy_port_is_refused_and_a_free_one_is_not() -> None:
    with reuseport_listener() as busy:
        port = busy.getsockname()[1]
        with pytest.raises(SwarmError, match="already in use"):
            refuse_shared_port(multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}"))
    refuse_shared_port(multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}"))  # free again
    refuse_shared_port(multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("daemon", ["node", "verifier"])
def test_unreachable_initial_peers_and_busy_ports_give_one_line(
    daemon: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = [daemon, "start", "--model", str(tiny_model_dir), "--identity", str(tmp_path / "k")]
    if daemon == "node":
        base += ["--blocks", "0:6"]
    else:
        base += ["--db", f"sqlite:///{tmp_path / 'v.db'}"]
    with reuseport_listener() as busy:
        port = busy.getsockname()[1]
        taken = run(*base, "--initial-peers", UNREACHABLE, "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    unreachable = run(*base, "--initial-peers", UNREACHABLE, "--listen", "/ip4/127.0.0.1/tcp/0")
    for result, message in [
        (taken, f"error: cannot listen on /ip4/127.0.0.1/tcp/{port}: Address already in use"),
        (unreachable, "error: none of the 1 initial peers answered"),
    ]:
        assert result.returncode == 1, result.stderr[-2000:]
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_reputation_show_from_an_unreachable_swarm_gives_one_line(tiny_model_dir: Path) -> None:
    result = run(
        "reputation", "show", "--model", str(tiny_model_dir),
        "--initial-peers", UNREACHABLE, "--verifier", UNREACHABLE.rsplit("/", 1)[1],
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: none of the 1 initial peers answered" in result.stderr
    assert "Traceback" not in result.stderr


def test_our_error_is_found_inside_nested_exception_groups() -> None:
    ours = SwarmError("no route")
    nested = ExceptionGroup("outer", [ValueError("x"), ExceptionGroup("inner", [ours])])
    assert trustswarm_error_in(nested) is ours
    assert trustswarm_error_in(ours) is ours
    assert trustswarm_error_in(ExceptionGroup("g", [ValueError("x")])) is None
    assert trustswarm_error_in(KeyboardInterrupt()) is None


def test_help_and_flag_errors_do_not_load_torch_or_libp2p() -> None:
    """`--help` and argparse errors answer at once (torch + transformers take ~7 s)."""
    probe = (
        "import sys\n"
        "from trustswarm.cli import build_parser\n"
        "parser = build_parser()\n"
        "for argv in (['node', 'start', '--help'], ['verifier', 'start', '--help'],\n"
        "             ['reputation', 'show', '--help'], ['model', 'import', '--help']):\n"
        "    try:\n"
        "        parser.parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'libp2p', 'sqlalchemy')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
