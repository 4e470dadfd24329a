"""Measured throughput on the health page (health/measure.py): real servers on loopback
(tiny model) — an honest one, one that announces 10,000x its speed, one whose answers a
client must refuse — measured by a real HealthCollector with the client's own checks."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.verifier_env import one_torch_thread  # noqa: F401 - fixture
from trustswarm.cli import main
from trustswarm.health.collect import HealthCollector, load_manifest
from trustswarm.health.errors import HealthError
from trustswarm.health.measure import (
    FAILED_BACKOFF,
    MAX_TOKENS,
    MIN_COMPUTE_SHARE,
    MeasureConfig,
    boasting,
    net_throughput,
)
from trustswarm.health.metrics import metrics_registry, render_metrics
from trustswarm.health.render import render_page
from trustswarm.health.state import ServerRow, SwarmSnapshot
from trustswarm.node.handlers import ServingContext
from trustswarm.node.server import BlockServer
from trustswarm.testing.adversary import dtype_liar_server_cls
from trustswarm.testing.local_swarm import LocalSwarm

pytestmark = pytest.mark.timeout(120)
BOAST = 10_000.0
EVERY = 1.0  # the least MeasureConfig allows


class Boaster(BlockServer):
    """Announces BOAST times the throughput it measured itself."""

    def _make_context(self) -> ServingContext:
        self.throughput *= BOAST
        return super()._make_context()


# ----------------------------------------------------------------------- pure functions


@given(
    tokens=st.integers(1, MAX_TOKENS),
    seconds=st.floats(allow_nan=True, allow_infinity=True),
    rtt=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_net_throughput_is_bounded_or_none(tokens: int, seconds: float, rtt: float | None):
    speed = net_throughput(tokens, seconds, rtt)
    if not (math.isfinite(seconds) and seconds > 0) or not math.isfinite(tokens / seconds * 10):
        assert speed is None or math.isfinite(speed)
        return
    assert speed is not None and speed > 0
    # RTT jitter (or a hostile RTT) never makes a request look faster than 1/share of it
    assert speed <= tokens / (MIN_COMPUTE_SHARE * seconds) * (1 + 1e-9)
    assert speed >= tokens / seconds * (1 - 1e-9)  # never slower than the raw wall time


def test_net_throughput_subtracts_the_rtt():
    assert net_throughput(16, 0.5, 0.1) == pytest.approx(40.0)
    assert net_throughput(16, 0.5, None) == pytest.approx(32.0)
    assert net_throughput(16, 0.5, 5.0) == pytest.approx(16 / (0.5 * MIN_COMPUTE_SHARE))
    assert net_throughput(0, 0.5, 0.1) is None


@pytest.mark.parametrize(
    ("announced", "measured", "flagged"),
    [
        (100.0, 10.0, True),
        (100.0, 25.0, False),  # exactly the factor: not flagged
        (100.0, None, False),  # nothing measured: no claim either way
        (100.0, math.nan, False),
        (math.inf, 10.0, False),
        (1e9, 0.0, True),
    ],
)
def test_boasting(announced: float, measured: float | None, flagged: bool):
    assert boasting(announced, measured, 4.0) is flagged


@pytest.mark.parametrize(
    "options",
    [
        {"every": 0.5},
        {"every": math.nan},
        {"every": True},
        {"tokens": 0},
        {"tokens": MAX_TOKENS + 1},
        {"tokens": 2.0},
        {"concurrency": 0},
        {"timeout": math.inf},
        {"boast_factor": 0.5},
    ],
)
def test_measure_config_refuses_bad_values(options: dict):
    with pytest.raises(HealthError):
        MeasureConfig(**options)


def test_load_manifest(tiny_model_dir: Path, tmp_path: Path):
    assert load_manifest(tiny_model_dir).hidden_size > 0
    assert load_manifest(tiny_model_dir / "manifest.json").num_blocks == 6
    with pytest.raises(HealthError, match="cannot read"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(HealthError, match="manifest"):
        load_manifest(tmp_path)


# ----------------------------------------------------------------------- real swarm


def _rows(collector: HealthCollector) -> dict[str, ServerRow]:
    snapshot = collector.latest
    return {r.peer_id: r for m in (snapshot.models if snapshot else ()) for r in m.servers}


def _wait_measured(collector: HealthCollector, peers: list[str], timeout: float) -> SwarmSnapshot:
    deadline = time.monotonic() + timeout
    while True:
        rows = _rows(collector)
        done = [p for p in peers if p in rows and rows[p].measured_at is not None]
        if len(done) == len(peers):
            return collector.latest
        if time.monotonic() > deadline:
            raise TimeoutError(f"measured {len(done)}/{len(peers)} within {timeout} s: {rows}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def measured(tiny_model_dir: Path, one_torch_thread):  # noqa: ANN001, ANN201, F811
    swarm = LocalSwarm(tiny_model_dir)
    collector = None
    try:
        honest = swarm.start_server((0, 6))
        boaster = swarm.start_server((0, 6), server_cls=Boaster)
        liar = swarm.start_server(
            (0, 6), server_cls=dtype_liar_server_cls("float32"), dtype=torch.bfloat16
        )
        collector = HealthCollector(
            initial_peers=swarm.initial_peers,
            refresh=1.0,
            manifests=[load_manifest(tiny_model_dir)],
            # 64 tokens: the tiny model's compute must not drown in the request's overhead
            measure=MeasureConfig(every=EVERY, tokens=64, timeout=10.0),
        )
        collector.start()
        began = time.monotonic()
        peers = [s.peer_id for s in (honest, boaster, liar)]
        _wait_measured(collector, peers, timeout=60)
        yield collector, honest, boaster, liar, began
    finally:
        if collector is not None:
            collector.close()
        swarm.close()


def test_servers_are_measured_and_the_boaster_is_flagged(measured):  # noqa: ANN001
    collector, honest, boaster, liar, _ = measured
    rows = _rows(collector)
    model = collector.latest.models[0]
    assert model.num_blocks == 6  # from the manifest
    good = rows[honest.peer_id]
    assert good.measure_error is None and good.measured_throughput > 0
    print(
        f"\n[measure] honest announced {good.throughput:.0f}, measured {good.measured_throughput:.0f}"
    )
    assert not good.boasting, (good.throughput, good.measured_throughput)
    assert rows[boaster.peer_id].measure_error is None
    assert rows[boaster.peer_id].boasting
    # Its answers are not in the dtype it announced: the client's own check refuses them.
    bad = rows[liar.peer_id]
    assert bad.measured_throughput is None and "answered in bfloat16" in bad.measure_error
    assert not bad.boasting


def test_measurements_reach_page_json_and_metrics(measured):  # noqa: ANN001
    collector, honest, boaster, liar, _ = measured
    snapshot = collector.latest
    page = render_page(snapshot)
    assert "Measured tok/s" in page and page.count("badge boasting") == 1
    row = page.split(f'data-peer="{boaster.peer_id}"')[1].split("</tr>")[0]
    assert "boasting" in row
    servers = {s["peer_id"]: s for s in snapshot.to_json()["models"][0]["servers"]}
    assert servers[honest.peer_id]["measured_throughput"] > 0
    assert servers[liar.peer_id]["measure_error"]
    metrics = render_metrics(metrics_registry(lambda: snapshot)).decode()
    model_id = snapshot.models[0].model_id
    assert (
        f'trustswarm_server_boasting{{model="{model_id}",peer_id="{boaster.peer_id}"}} 1.0'
    ) in metrics
    assert (
        f'trustswarm_server_boasting{{model="{model_id}",peer_id="{honest.peer_id}"}} 0.0'
    ) in metrics


def test_each_server_is_measured_at_most_once_per_interval(measured):  # noqa: ANN001
    collector, honest, boaster, liar, began = measured
    time.sleep(3.0)
    probe = collector.watches[collector.latest.models[0].model_id].probe
    elapsed = time.monotonic() - began
    # one request per server per EVERY * 0.9 s at most (jitter), plus the first round
    for server in (honest, boaster):
        assert 1 <= probe.requests[server.peer_id] <= elapsed / (EVERY * 0.9) + 1
    # a server whose answers fail waits FAILED_BACKOFF times longer between requests
    assert 1 <= probe.requests[liar.peer_id] <= elapsed / (EVERY * FAILED_BACKOFF * 0.9) + 1


def test_no_measuring_without_a_manifest_or_when_off(tiny_model_dir: Path):
    peer = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"
    manifest = load_manifest(tiny_model_dir)
    off = HealthCollector([peer], manifests=[manifest], measure=MeasureConfig(enabled=False))
    assert off._new_watch(manifest.model_id).probe is None
    assert HealthCollector([peer])._new_watch(manifest.model_id).probe is None


def test_health_cli_model_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    peer = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"
    assert main(["health", "--initial-peers", peer, "--model", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["health", "--initial-peers", peer, "--measure-every", "5"])
    assert info.value.code == 2
    assert "10 to 86400" in capsys.readouterr().err
