"""A swarm over several hosts on one machine (issue 12, the small version of bench/scale.py).

Network namespaces from trustswarm.testing.netns: 3 server hosts with 7 tiny-model
servers each (one of them a cheater boasting 20x throughput and adding noise to every
answer), a verifier host running `trustswarm verifier start`, a client host. The client
is a real DistributedModelForCausalLM with redundancy=3 whose event loop lives in the
client namespace; every connection crosses veths and a bridge, and each host has its
own /24 (198.18.<host>.1), so observed addresses tell hosts apart.

Needs root and iproute2 (CI runs as root); skipped with the reason otherwise.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.client.redundant import choose_replicas
from trustswarm.client.replicas import network_of
from trustswarm.testing.local_verifier import wait_until
from trustswarm.testing.netns import (
    LinkShape,
    TestBed,
    TestBedError,
    run_ip,
    unavailable_reason,
)
from trustswarm.testing.netns_swarm import BedSwarm

REASON = unavailable_reason()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.timeout(420),
]
SERVER_HOSTS = ("h0", "h1", "h2")
SPANS = [(0, 3), (3, 6), (0, 6), (0, 2), (2, 4), (4, 6), (0, 6)]
NUM_BLOCKS = 6
BENCHMARKING = ipaddress.ip_network("198.18.0.0/15")


@dataclass
class Bed:
    bed: TestBed
    swarm: BedSwarm
    client: DistributedModelForCausalLM
    reference: torch.nn.Module
    cheat: str  # the cheater's peer id
    verifier: str  # the verifier's multiaddr
    began: float  # when the client started (monotonic)

    def host_of(self, peer_id: str) -> str:
        return next(s["host"] for s in self.swarm.servers() if s["peer_id"] == peer_id)

    def expected(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        with torch.no_grad():
            return self.reference.generate(
                ids, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(ids)
            )


def layout() -> dict[str, list[dict]]:
    hosts = {h: [{"span": list(s), "seed": i} for i, s in enumerate(SPANS)] for h in SERVER_HOSTS}
    hosts["h2"][-1] = {"span": [0, NUM_BLOCKS], "kind": "noise", "seed": 7}
    return hosts


def namespaces() -> set[str]:
    return {line.split()[0] for line in run_ip(["netns", "list"]).stdout.splitlines() if line}


def test_hosts_get_their_own_benchmarking_range_addresses_and_a_failing_body_cleans_up():
    before = namespaces()
    with pytest.raises(RuntimeError, match="test body failed"):
        with TestBed(["a", "b", "c"], prefix="tsunit") as testbed:
            made = {testbed.bridge_ns, *(h.namespace for h in testbed.hosts.values())}
            assert made <= namespaces()
            addresses = [ipaddress.ip_address(h.address) for h in testbed.hosts.values()]
            assert all(a in BENCHMARKING for a in addresses)
            assert len({ipaddress.ip_network(f"{a}/24", strict=False) for a in addresses}) == 3
            # Nothing but loopback and our veth in a host; the bridge sees every host.
            links = run_ip(["-n", testbed.host("a").namespace, "-o", "link"]).stdout
            assert {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()} == {
                "lo",
                "eth0",
            }
            # Host a reaches host c across the bridge, and not once c is cut off it.
            c = testbed.host("c").address
            with testbed.inside("c"):
                listener = socket.create_server((c, 0))
            try:
                port = listener.getsockname()[1]
                with testbed.inside("a"):
                    socket.create_connection((c, port), timeout=5).close()
                    testbed.cut("c")
                    with pytest.raises(OSError):
                        socket.create_connection((c, port), timeout=1).close()
                    testbed.restore("c")
                    socket.create_connection((c, port), timeout=5).close()
            finally:
                listener.close()
            raise RuntimeError("test body failed")
    assert namespaces() == before  # all deleted, although the body raised


def test_shaping_limits_a_hosts_bandwidth_and_refuses_what_the_kernel_lacks():
    with TestBed(["a", "c"], prefix="tsunit") as testbed:
        if not testbed.shaping.netem:
            with pytest.raises(TestBedError, match="netem"):
                testbed.shape("a", LinkShape(delay_ms=10))
        if not testbed.shaping.tbf:
            pytest.skip(testbed.shaping.describe())
        testbed.shape("a", LinkShape(rate_mbit=8))  # a's outgoing traffic: 1 MB/s
        c = testbed.host("c").address
        with testbed.inside("c"):
            listener = socket.create_server((c, 0))
        received = []

        def drain() -> None:
            conn, _ = listener.accept()
            with conn:
                while chunk := conn.recv(1 << 16):
                    received.append(len(chunk))

        reader = threading.Thread(target=drain)
        reader.start()
        try:
            began = time.monotonic()
            with testbed.inside("a"):
                sender = socket.create_connection((c, listener.getsockname()[1]), timeout=30)
            with sender:
                sender.sendall(b"x" * 1_500_000)
            reader.join(30)
            seconds = time.monotonic() - began
        finally:
            listener.close()
        assert sum(received) == 1_500_000
        assert seconds > 1.0, seconds  # 12 Mbit at 8 Mbit/s: at least ~1.4 s


def test_a_later_bed_removes_what_a_killed_run_left_behind():
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    stale = f"tsunit-{dead.pid}-x"
    run_ip(["netns", "add", stale])
    orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        time.sleep(0.3)  # inside the namespace by now
        with TestBed(["a"], prefix="tsunit"):
            assert stale not in namespaces()
            assert orphan.wait(5) == -signal.SIGKILL  # what ran inside it is gone too
    finally:
        orphan.kill()
        run_ip(["netns", "delete", stale], check=False)


def test_bed_processes_die_with_the_thread_that_started_them():
    with TestBed(["a"], prefix="tsunit") as testbed:
        started: list[subprocess.Popen] = []
        thread = threading.Thread(
            target=lambda: started.append(testbed.popen("a", ["sleep", "60"]))
        )
        thread.start()
        thread.join()
        assert started[0].wait(5) == -signal.SIGKILL


def test_bad_arguments_are_refused_before_anything_is_built():
    before = namespaces()
    for hosts, prefix in (
        (["a", "a"], "tsunit"),
        (["A"], "tsunit"),
        (["a"], "x y"),
        ([], "tsunit"),
    ):
        with pytest.raises(TestBedError):
            TestBed(hosts, prefix=prefix)
    with pytest.raises(TestBedError):
        LinkShape(delay_ms=float("nan"))
    with pytest.raises(TestBedError):
        LinkShape(loss_percent=101)
    assert namespaces() == before


@pytest.fixture(scope="module")
def bed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    workdir = tmp_path_factory.mktemp("multihost")
    with TestBed([*SERVER_HOSTS, "ver", "cl"], prefix="tsmh") as testbed:
        swarm = BedSwarm(testbed, tiny_model_dir, workdir)
        swarm.start_servers(layout())
        cheat = next(s["peer_id"] for s in swarm.servers() if s["kind"] == "noise")
        _, verifier = swarm.start_verifier(
            "ver", "verifier", "--check-every", "0.3", "--republish-every", "5"
        )
        began = time.monotonic()
        with testbed.inside("cl"):
            client = DistributedModelForCausalLM.from_pretrained(
                tiny_model_dir,
                swarm.bootstrap,
                redundancy=3,
                trusted_verifiers=[verifier],
                request_timeout=5.0,
                connect_timeout=3.0,
            )
        reference = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir.parent / "hf", dtype=torch.float32
        ).eval()
        try:
            yield Bed(testbed, swarm, client, reference, cheat, verifier, began)
        finally:
            client.close()
    # The namespaces are gone with the bed.
    assert not [n for n in (testbed.bridge_ns, *(h.namespace for h in testbed.hosts.values()))
                if (Path("/run/netns") / n).exists()]  # fmt: skip


def covered(view) -> bool:  # noqa: ANN001 - a SwarmView
    return all(any(a.covers(b) for a in view.servers.values()) for b in range(NUM_BLOCKS))


def test_a_new_client_sees_every_block_and_every_server(bed: Bed):
    view = bed.client.swarm.view
    wait_until(lambda: covered(view), timeout=20)
    seconds = time.monotonic() - bed.began
    expected = {s["peer_id"] for s in bed.swarm.servers()}
    assert len(expected) == 3 * len(SPANS) >= 20

    def all_seen() -> bool:
        if not expected <= set(view.servers):
            bed.client.run_async(bed.client.swarm.refresh)
        return expected <= set(view.servers)

    wait_until(all_seen, timeout=60, every=1.0)
    # Bounded discovery, not the fallback (every server speaks /discover; with 21 servers
    # the askers' info samples may already name enough, so pages are not required).
    stats = bed.client.swarm.last_discovery
    assert stats is not None and not bed.client.swarm.no_discover, stats
    print(f"\n[multihost] full coverage {seconds:.1f} s after the client started")
    # Each server was reached at its host's own address, across the bridge.
    hosts = {s["peer_id"]: bed.bed.host(s["host"]).address for s in bed.swarm.servers()}
    observed = {p: view.observed.get(p) for p in expected}
    assert observed == hosts


def test_generation_over_the_hosts_equals_the_local_model(bed: Bed):
    ids = torch.randint(1, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(bed.client.generate(ids, max_new_tokens=8), bed.expected(ids, 8))


def test_replicas_are_chosen_on_distinct_observed_hosts(bed: Bed):
    view = bed.client.swarm.view
    for start, end in [(0, 3), (3, 6), (0, 2)]:
        chosen = choose_replicas(view, start, end, 3, set())
        networks = {network_of(view.observed[a.peer_id]) for a in chosen}
        assert len(chosen) == 3 and len(networks) == 3, (start, end, networks)
        assert {bed.host_of(a.peer_id) for a in chosen} == set(SERVER_HOSTS)


def test_generation_survives_a_cut_host_and_churn(bed: Bed):
    ids = torch.randint(1, 512, (1, 8), generator=torch.Generator().manual_seed(2))
    expected = bed.expected(ids, 6)
    bed.bed.cut("h1")
    try:
        began = time.monotonic()
        assert torch.equal(bed.client.generate(ids, max_new_tokens=6), expected)
        cut_for = time.monotonic() - began
    finally:
        bed.bed.restore("h1")
    # 10 % of the servers (2 of 21) killed; generation goes on; they come back.
    victims = [("h0", 2), ("h2", 0)]
    for host, index in victims:
        bed.swarm.runners[host].stop_server(index)
    assert torch.equal(bed.client.generate(ids, max_new_tokens=6), expected)
    for host, index in victims:
        back = bed.swarm.runners[host].start_server(index)
        assert back["addrs"][0].startswith(f"/ip4/{bed.bed.host(host).address}/")
    assert torch.equal(bed.client.generate(ids, max_new_tokens=6), expected)
    print(f"\n[multihost] generation with h1 cut took {cut_for:.1f} s")


def test_the_verifiers_ban_of_the_cheater_reaches_the_client(bed: Bed):
    trust = bed.client.swarm.view.trust
    seconds = wait_until(lambda: trust.state(bed.cheat) == "banned", timeout=120, every=0.5)
    print(f"\n[multihost] the client held the ban {seconds:.1f} s after this test began")
    assert bed.cheat not in {a.peer_id for a in bed.client.swarm.view.usable()}
    honest = [s["peer_id"] for s in bed.swarm.servers() if s["kind"] == "honest"]
    assert not [p for p in honest if trust.banned(p)]
