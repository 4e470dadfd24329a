"""The health page end to end: a real 4-server loopback swarm (tiny model) with one
cheater that a real verifier bans, `HealthCollector` running the client's discovery and
trust feed, the app under a real uvicorn on 127.0.0.1, and the system's headless
chromium (selenium) reading the page."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.verifier_env import one_torch_thread  # noqa: F401 - fixture
from trustswarm.cli import main
from trustswarm.health.state import HEALTHY
from trustswarm.testing.health_env import (
    BrowserMissing,
    CheatedSwarm,
    headless_chromium,
    serve_web,
    start_cheated_swarm,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        return response.headers.get("content-type", ""), response.read().decode()


@pytest.fixture(scope="module")
def cheated(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread):  # noqa: ANN001, ANN201, F811
    """3 honest servers, a cheater tampering with every answer, a verifier, a collector;
    yielded once the collector lists all 4 and shows the cheater banned."""
    began = time.monotonic()
    db = tmp_path_factory.mktemp("health") / "v.db"
    env = start_cheated_swarm(tiny_model_dir, f"sqlite:///{db}", [(0, 3), (3, 6), (0, 6)], (0, 6))
    try:
        wait_for(env.collector, servers=4, banned=[env.cheat.peer_id], timeout=60)
        print(
            f"\n[health page] 4 servers listed, cheater banned {time.monotonic() - began:.1f} s after start"
        )
        env.web = serve_web(lambda: env.collector.latest)
        yield env
    finally:
        env.close()


def test_health_page_in_a_browser(cheated: CheatedSwarm, tmp_path: Path):
    try:
        driver = headless_chromium()
    except BrowserMissing as exc:
        pytest.skip(f"no headless browser: {exc}")
    env, cheat = cheated, cheated.cheat.peer_id
    try:
        model = env.collector.latest.models[0]
        assert model.status == HEALTHY and model.num_blocks == 6
        assert min(model.coverage) >= 2  # the cheater is not counted
        driver.get(env.web.url)
        rows = {
            r.get_attribute("data-peer"): r
            for r in driver.find_elements("css selector", "tr[data-peer]")
        }
        assert set(rows) == {s.peer_id for s in [*env.honest, env.cheat]}
        assert "banned" in rows[cheat].get_attribute("class")
        assert "banned by verifier" in rows[cheat].text
        for server in env.honest:
            assert "banned" not in rows[server.peer_id].get_attribute("class")
        assert "healthy" in driver.find_element("css selector", "section h2").text
        shot = tmp_path / "health.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()


def test_state_and_metrics(cheated: CheatedSwarm):
    env, cheat = cheated, cheated.cheat.peer_id
    model_id = env.swarm.model_dir.manifest.model_id
    kind, text = _get(env.web.url + "api/v1/state")
    assert kind.startswith("application/json")
    servers = {s["peer_id"]: s for s in json.loads(text)["models"][0]["servers"]}
    assert servers[cheat]["banned"] and servers[cheat]["state"] == "banned"
    assert all(servers[s.peer_id]["rtt"] > 0 for s in env.honest)  # measured RTTs
    kind, metrics = _get(env.web.url + "metrics")
    assert kind.startswith("text/plain")
    assert f'trustswarm_server_banned{{model="{model_id}",peer_id="{cheat}"}} 1.0' in metrics


def test_health_command_serves_the_swarm(cheated: CheatedSwarm):
    """`trustswarm health` as a user runs it: a process, its URL on stdout, SIGTERM."""
    env, cheat = cheated, cheated.cheat.peer_id
    cmd = [
        sys.executable, "-m", "trustswarm", "health", "--listen", "127.0.0.1:0",
        "--refresh", "1", "--log-level", "WARNING",
        "--model-id", env.swarm.model_dir.manifest.model_id,
        "--trusted-verifier", env.verifier.addrs[0], "--initial-peers", *env.swarm.initial_peers,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        deadline = time.monotonic() + 40
        while True:
            state = json.loads(_get(url + "api/v1/state")[1])
            rows = {s["peer_id"]: s for m in state["models"] for s in m["servers"]}
            if len(rows) == 4 and rows.get(cheat, {}).get("banned"):
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
        assert state["models"][0]["status"] == HEALTHY
        print(f"\n[health command] settled {time.monotonic() - deadline + 40:.1f} s after its URL")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_cli_rejects_bad_options(capsys: pytest.CaptureFixture[str]):
    peer = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"
    assert main(["health", "--initial-peers", "not-an-addr"]) == 2
    assert "initial peer" in capsys.readouterr().err
    assert main(["health", "--initial-peers", peer, "--trusted-verifier", "0000"]) == 2
    assert "not a peer id" in capsys.readouterr().err
    assert main(["health", "--initial-peers", peer, "--listen", "127.0.0.1:99999"]) == 2
    assert "0-65535" in capsys.readouterr().err
