"""Testing only: a block server that also spreads genuinely signed announcements with
hostile fields (issue 12's measured attacks): NaN / Infinity / 1e308 throughput, an
unparsable address, a span beyond any model, an infinite lifetime.

Each record is signed by a fresh identity of its own (what an attacker gets for free)
without our field checks. The server keeps them in its own DHT store (so its info
answers carry them, as a node with a broken validator would) and pushes them to its
DHT peers every announce round; honest validators must refuse them. It serves its
blocks honestly, so only the records can do harm.
"""

from __future__ import annotations

import json
import logging
import time

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from trustswarm.node.handlers import Handler, ServingContext
from trustswarm.node.server import BlockServer
from trustswarm.protocol.announcement import Announcement, SignedAnnouncement, announcement_key
from trustswarm.protocol.discovery import DISCOVER, DiscoveryPage, DiscoveryQuery, fill_page
from trustswarm.protocol.framing import read_frame, write_frame
from trustswarm.protocol.identity import Identity

log = logging.getLogger("trustswarm.testing.hostile_records")
HOSTILE_FIELDS: tuple[dict[str, object], ...] = (
    {"throughput": float("nan")},
    {"throughput": float("inf")},
    {"throughput": 1e308},
    {"addrs": ("not-a-multiaddr",)},
    {"start": 0, "end": 4000},
    {"expires_at": float("inf")},
)


def hostile_announcement(
    model_id: str, digest: str, overrides: dict[str, object], now: float | None = None
) -> tuple[str, bytes]:
    """A validly signed announcement of a fresh identity with `overrides`; its DHT key."""
    who = Identity.generate()
    now = time.time() if now is None else now
    fields = {
        "peer_id": str(who.peer_id), "model_id": model_id, "start": 0, "end": 1,
        "weights_digest": digest, "dtype": "float32", "throughput": 100.0,
        "addrs": ("/ip4/198.18.255.1/tcp/9",), "issued_at": now, "expires_at": now + 120,
    } | overrides  # fmt: skip
    ann = Announcement(**fields)
    signed = SignedAnnouncement(ann, who.sign(ann.canonical_bytes()))
    return announcement_key(model_id, ann.peer_id), signed.to_bytes()


def hostile_record_server_cls() -> type[BlockServer]:
    class HostileRecordServer(BlockServer):
        spread: int = 0  # records pushed to peers that a peer accepted

        async def _spread_hostile(self) -> None:
            for overrides in HOSTILE_FIELDS:
                key, value = hostile_announcement(
                    self.model_id, self.runner.weights_digest, overrides
                )
                self.dht.value_store.put(key.encode(), value, validity=time.time() + 120)
                with trio.move_on_after(5):
                    try:
                        await self.dht.put_value(key, value)
                        self.spread += 1
                    except Exception as exc:  # refused by honest validators: expected
                        log.debug("hostile record refused: %s", exc)

        async def _announce_forever(self) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(super()._announce_forever)
                while True:
                    await self._spread_hostile()
                    await trio.sleep(self.config.announce_every)

    return HostileRecordServer


# A discover server's lies (HostileDiscoverServer.mode). Every mode also serves its
# blocks honestly: only its discover answers are hostile.
DISCOVER_MODES = ("junk", "sybils", "repeat", "stall", "oversized")


def junk_records(model_id: str, digest: str, now: float | None = None) -> list[str]:
    """Records a client must refuse, one of each kind: a forged signature, expired,
    another model, other weights, a span beyond any model, each hostile field, a
    duplicate of the forged one, and text that is not an announcement at all."""
    now = time.time() if now is None else now
    raw = json.loads(hostile_announcement(model_id, digest, {})[1])
    other = json.loads(hostile_announcement(model_id, digest, {})[1])
    raw["signature"] = other["signature"]  # someone else's signature
    cases: list[dict[str, object]] = [
        {"issued_at": now - 300, "expires_at": now - 100},
        {"model_id": "someone/else"},
        {"weights_digest": "0" * 64},
        *HOSTILE_FIELDS,
    ]
    records = [json.dumps(raw)]
    records += [hostile_announcement(model_id, digest, c, now)[1].decode() for c in cases]
    return [*records, records[0], "not json", '{"announcement": {}, "signature": 1}']


def sybil_records(model_id: str, digest: str, count: int, num_blocks: int) -> list[str]:
    """Validly signed announcements of fresh identities for our model and weights, at
    addresses where nobody listens (what boasting Sybils cost: nothing)."""
    return [
        hostile_announcement(model_id, digest, {"throughput": 1e9, "start": 0, "end": num_blocks})[
            1
        ].decode()
        for _ in range(count)
    ]


def hostile_discover_server_cls(mode: str) -> type[BlockServer]:
    """A block server whose discover answers are hostile (see DISCOVER_MODES)."""
    if mode not in DISCOVER_MODES:
        raise ValueError(f"mode must be one of {DISCOVER_MODES}, got {mode!r}")

    class HostileDiscoverServer(BlockServer):
        pages_served: int = 0

        def _discover(self, query: DiscoveryQuery) -> DiscoveryPage:
            self.pages_served += 1
            model, digest = self.model_id, self.model_dir.manifest.span_digest
            full = digest(0, self.model_dir.num_blocks)
            if mode == "junk":
                records = junk_records(model, digest(0, 1))
                # the weights of block 0 announced for every block
                mislabeled = {"end": self.model_dir.num_blocks}
                records.append(hostile_announcement(model, digest(0, 1), mislabeled)[1].decode())
            elif mode == "sybils":  # endless pages of fresh Sybils spanning every block
                records = sybil_records(model, full, 28, self.model_dir.num_blocks)
            else:  # "repeat": its own announcement, over and over, never the last page
                records = [self.announcement.to_bytes().decode()] * 28
            page, _ = fill_page(records, "", 10**6)
            return DiscoveryPage(page.records, f"{'ab' * 8}.{'cd' * 8}", 10**6)

        def _stream_handlers(self) -> list[tuple[TProtocol, str, Handler]]:
            handlers = super()._stream_handlers()
            if mode in ("stall", "oversized"):
                handlers = [h for h in handlers if h[0] != DISCOVER]
                handlers.append((DISCOVER, "discover", _misbehave))
            return handlers

    async def _misbehave(ctx: ServingContext, stream: INetStream) -> None:
        await read_frame(stream, ctx.config.limits)
        if mode == "stall":  # never answers
            await trio.sleep_forever()
        await write_frame(stream, b"\0" * (1 << 20))  # a 1 MiB frame for a ~64 KiB page

    return HostileDiscoverServer
