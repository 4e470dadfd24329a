"""Testing only: the health page of a real LocalSwarm with a cheater a real verifier bans,
served by a real uvicorn on 127.0.0.1 and looked at by the system's headless chromium
(tests/test_health_page.py and bench/health_screenshot.py)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from trustswarm.health.app import health_app
from trustswarm.health.cli import bind
from trustswarm.health.collect import HealthCollector
from trustswarm.health.state import SwarmSnapshot
from trustswarm.testing.adversary import Tamper, adversarial_server_cls
from trustswarm.testing.local_swarm import LocalSwarm, RunningServer
from trustswarm.testing.local_verifier import RunningVerifier, start_verifier, stop_verifier
from trustswarm.verifier.config import CheckConfig, VerifierConfig

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER_PATHS = ("/usr/bin/chromedriver",)
# Checks often enough that the cheater (tampering every answer) is banned in seconds.
FAST_CHECKS = VerifierConfig(
    checks=CheckConfig(check_every=0.3, checkers=1, max_new_tokens=8),
    refresh_every=2.0,
    republish_every=5.0,  # a page started later sees the records on gossip within 5 s
)


class BrowserMissing(RuntimeError):
    """No system chromium / chromedriver (Debian: apt-get install chromium chromium-driver)."""


def find_browser() -> tuple[str, str]:
    """Paths of the system chromium and chromedriver. Raises BrowserMissing."""
    browser = next((p for p in CHROMIUM_PATHS if Path(p).exists()), shutil.which("chromium"))
    driver = next((p for p in CHROMEDRIVER_PATHS if Path(p).exists()), shutil.which("chromedriver"))
    if browser is None or driver is None:
        missing = " and ".join(
            name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path
        )
        raise BrowserMissing(
            f"{missing} not installed (apt-get install -y chromium chromium-driver)"
        )
    return browser, driver


def headless_chromium(width: int = 1440, height: int = 900):  # noqa: ANN201 - a selenium WebDriver
    """Selenium on the system chromium and chromedriver (nothing is downloaded)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserMissing("selenium is not installed (pip install -e '.[dev]')") from None
    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@dataclass
class WebServer:
    """A uvicorn server in a thread on an already bound socket."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_web(source: Callable[[], SwarmSnapshot | None], listen: str = "127.0.0.1:0") -> WebServer:
    """The health app on `source`'s snapshots (e.g. a collector's latest)."""
    sock = bind(listen)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(health_app(source), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="health-web", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.02)
    return WebServer(server, thread, f"http://{host}:{port}/")


@dataclass
class CheatedSwarm:
    """Honest servers, one cheater tampering with every answer, a verifier, a collector."""

    swarm: LocalSwarm
    honest: list[RunningServer]
    cheat: RunningServer
    verifier: RunningVerifier
    collector: HealthCollector
    web: WebServer | None = None
    extra: list[RunningServer] = field(default_factory=list)

    def close(self) -> None:
        if self.web is not None:
            self.web.stop()
        self.collector.close()
        stop_verifier(self.swarm, self.verifier)
        self.swarm.close()


def start_cheated_swarm(
    model_dir: Path,
    db_url: str,
    honest_spans: Sequence[tuple[int, int]],
    cheat_span: tuple[int, int],
    refresh: float = 2.0,
    config: VerifierConfig = FAST_CHECKS,
    **server_options: object,
) -> CheatedSwarm:
    swarm = LocalSwarm(model_dir)
    try:
        honest = [swarm.start_server(span, **server_options) for span in honest_spans]
        cheat = swarm.start_server(
            cheat_span,
            server_cls=adversarial_server_cls(Tamper("noise", amount=0.05, seed=7), boast=3.0),
            **server_options,
        )
        verifier = start_verifier(swarm, db_url, config)
        collector = HealthCollector(
            initial_peers=swarm.initial_peers,
            trusted_verifiers=[verifier.addrs[0]],
            refresh=refresh,
        )
        collector.start()
    except BaseException:
        swarm.close()
        raise
    return CheatedSwarm(swarm, honest, cheat, verifier, collector)


def wait_for(
    collector: HealthCollector, servers: int, banned: Sequence[str], timeout: float
) -> SwarmSnapshot:
    """Poll until one model shows `servers` servers and every peer in `banned` banned."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = collector.latest
        if snapshot is not None and snapshot.models:
            rows = {r.peer_id: r for m in snapshot.models for r in m.servers}
            if len(rows) >= servers and all(p in rows and rows[p].banned for p in banned):
                return snapshot
        if time.monotonic() > deadline:
            raise TimeoutError(f"the health view did not settle within {timeout} s: {snapshot}")
        time.sleep(0.1)
