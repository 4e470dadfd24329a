"""A real PostgreSQL server for the store tests: Debian's `postgresql` binaries, a cluster
made by `initdb` in a temporary directory, listening on a free port of 127.0.0.1 (and a
unix socket inside that directory), for the whole test session; stopped and removed at
teardown. Each test that asks for `postgres_url` gets a fresh, empty database.

`initdb` and `postgres` refuse to run as root: as root they run as the `postgres` system
user (set in the child process, as `runuser` would), which owns the temporary directory. Tests skip, saying why, only when
the server binaries are not installed (`apt-get install -y postgresql`).

`store_url` is the fixture the store tests take: once a SQLite file, once PostgreSQL.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

USER = "trustswarm"
_databases = itertools.count()


@dataclass(frozen=True)
class PostgresServer:
    port: int
    root: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"


def postgres_bindir() -> Path | None:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("postgres")
    return Path(found).parent if found and shutil.which("initdb") else None


def _as_owner(root: Path) -> dict[str, Any]:
    """Popen arguments that run a server binary as the `postgres` user when we are root
    (the server refuses root). Set in the child itself, so signals reach the server."""
    if os.geteuid() != 0:
        return {"cwd": root}
    return {"cwd": root, "user": "postgres", "group": "postgres", "extra_groups": []}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            psycopg.connect(f"host=127.0.0.1 port={port} user={USER} dbname=postgres").close()
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                tail = log.read_text()[-2000:]
                raise RuntimeError(f"postgres not ready in {timeout} s:\n{tail}") from exc
            time.sleep(0.1)


@contextlib.contextmanager
def running_postgres(bindir: Path) -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="trustswarm-pg-"))
    try:
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(root, account.pw_uid, account.pw_gid)
        data, sock, log = root / "data", root / "sock", root / "server.log"
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust"]
        owner = _as_owner(root)
        subprocess.run(
            [*initdb, "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True,
            capture_output=True,
            **owner,
        )
        subprocess.run(["mkdir", "-m", "700", str(sock)], check=True, **owner)
        port = _free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(sock),
            "max_connections": "100",
            "fsync": "off",  # a throwaway cluster: durability is not what is tested
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **owner)
        try:
            _wait_ready(proc, port, log, timeout=30)
            yield PostgresServer(port, root)
        finally:
            proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, postgres) not found: "
            "apt-get install -y postgresql"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
    with running_postgres(bindir) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    import psycopg

    name = f"t{os.getpid()}_{next(_databases)}"
    with psycopg.connect(
        f"host=127.0.0.1 port={postgres_server.port} user={USER} dbname=postgres",
        autocommit=True,
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.url(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The reputation store's URL: a SQLite file, then a database on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rep' / 'verifier.db'}"
    return request.getfixturevalue("postgres_url")
