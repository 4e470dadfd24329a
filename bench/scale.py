"""Discovery cost vs. the number of announced servers (issue 12).

N real tiny-model servers (12 blocks, random spans of 2-6 blocks) run on loopback in
this process, for each N of `--sizes`; with `--dead D` every node's DHT store also holds
D valid announcements of servers nobody runs (fresh identities, our model and weights,
an address where nothing listens: what boasting Sybils cost). For each N a fresh client
refreshes once

- by bounded discovery (client/refresh.py): pages asked, bytes of pages read, records
  seen, servers contacted, seconds;
- the old way (`discovery=None`: info from every known peer and the DHT, then contact
  everything the info samples named), for comparison;

and the table says what one refresh cost. Smoke run: `python bench/scale.py --sizes 4 8`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from trustswarm.client.discovery import DiscoveryBounds
from trustswarm.client.swarm import SwarmClient, SwarmView
from trustswarm.node.peers import known_announcements
from trustswarm.protocol.announcement import Announcement, announcement_key, sign_announcement
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.testing.tiny_model import make_tiny_model_dir

BLOCKS = 12


def dead_records(swarm: LocalSwarm, count: int, rng: random.Random) -> list[tuple[bytes, bytes]]:
    """(DHT key, record) of `count` announcements of servers nobody runs."""
    manifest = swarm.model_dir.manifest
    now, out = time.time(), []
    for _ in range(count):
        who = Identity.generate()
        start = rng.randrange(BLOCKS)
        end = rng.randrange(start + 1, BLOCKS + 1)
        ann = Announcement(
            str(who.peer_id), manifest.model_id, start, end, manifest.span_digest(start, end),
            "float32", 10.0, ("/ip4/127.0.0.1/tcp/9",), now, now + 3000,
        )  # fmt: skip
        key = announcement_key(manifest.model_id, ann.peer_id).encode()
        out.append((key, sign_announcement(who, ann).to_bytes()))
    return out


def fill_stores(swarm: LocalSwarm, records: list[tuple[bytes, bytes]]) -> None:
    """The same announcements of absent servers in every running node's store."""
    for node in swarm.servers:
        for key, value in records:
            node.server.dht.value_store.put(key, value, validity=time.time() + 3000)


def wait_for_stores(swarm: LocalSwarm, want: int, timeout: float = 60.0) -> None:
    """Until the first node's store holds `want` announcements (DHT puts take a while)."""
    first = swarm.servers[0].server
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(known_announcements(first.dht, first.model_id)) >= want:
            return
        time.sleep(0.5)
    print(f"warning: the first node's store holds fewer than {want} records", file=sys.stderr)


def one_refresh(swarm: LocalSwarm, bounds: DiscoveryBounds | None) -> dict[str, object]:
    manifest = swarm.model_dir.manifest
    view = SwarmView(manifest.model_id, manifest.span_digest, request_timeout=5.0)
    client = SwarmClient(
        make_host(Identity.generate()),
        view,
        swarm.initial_peers,
        connect_timeout=2.0,
        discovery=bounds,
    )
    dialled = 0
    contact = client.contact

    async def counting(peer: str, addrs: list) -> object:  # every info call of the refresh
        nonlocal dialled
        dialled += 1
        return await contact(peer, addrs)

    client.contact = counting  # type: ignore[method-assign]
    began = time.monotonic()

    async def start() -> None:
        await swarm.start_task(client.run)

    swarm.loop.run(start)
    row: dict[str, object] = {"seconds": round(time.monotonic() - began, 2)}
    row["servers_in_view"] = len(view.servers)
    row["dialled"] = dialled  # during the first refresh, since run() returned then
    stats = client.last_discovery
    if stats is not None:
        row |= {
            "pages": stats.pages,
            "page_kib": round(stats.page_bytes / 1024, 1),
            "records": stats.records,
        }
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| announced (running) | discovery: pages | KiB read | records seen | dialled | s "
        "| old way: dialled | s | servers in view (discovery / old) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        d, old = row["discovery"], row["old"]
        lines.append(
            f"| {row['announced']} ({row['running']}) | {d.get('pages')} | {d.get('page_kib')} | "
            f"{d.get('records')} | {d['dialled']} | {d['seconds']} | {old['dialled']} | "
            f"{old['seconds']} | "
            f"{d['servers_in_view']} / {old['servers_in_view']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--dead", type=int, default=0, help="absent servers announced")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if any(not 1 <= n <= 1000 for n in args.sizes) or not 0 <= args.dead <= 20_000:
        parser.error("sizes must lie in [1, 1000] and --dead in [0, 20000]")
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        swarm = LocalSwarm(make_tiny_model_dir(Path(tmp), num_layers=BLOCKS))
        try:
            dead = dead_records(swarm, args.dead, rng)
            for size in sorted(args.sizes):
                while len(swarm.servers) < size:
                    start = rng.randrange(BLOCKS - 1)
                    swarm.start_server((start, min(BLOCKS, start + rng.randint(2, 6))))
                fill_stores(swarm, dead)  # the new servers' stores too
                wait_for_stores(swarm, size + args.dead)
                row = {
                    "announced": size + args.dead,
                    "running": size,
                    "discovery": one_refresh(swarm, DiscoveryBounds()),
                    "old": one_refresh(swarm, None),
                }
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
        finally:
            swarm.close()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
