"""`trustswarm node/verifier start` as real processes, the way a user runs them."""

from __future__ import annotations

import signal
import subprocess
import sys

PY = [sys.executable, "-m", "trustswarm"]
LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--log-level", "WARNING"]


def launch(*args: str) -> tuple[subprocess.Popen, str]:
    """Start `trustswarm <args>` on loopback; return the process and the multiaddr it prints."""
    proc = subprocess.Popen(
        [*PY, *args, *LOOPBACK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("/ip4/127.0.0.1/tcp/"):
        proc.kill()
        raise AssertionError(f"no multiaddr printed: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM, then the exit code; a crash on the way out shows its stderr."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=20)
    if code != 0:
        print(proc.stderr.read()[-4000:], file=sys.stderr)
    return code
