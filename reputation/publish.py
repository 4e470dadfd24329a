"""RecordPublisher: put signed reputation records in the DHT and on gossipsub, paced.

py-libp2p's gossipsub silently drops publishes beyond ~10 per second per (forwarder,
topic) and beyond a 32-entry outbound queue, so publishes are spaced by
`pace_seconds` (also across calls). Gossip is best effort by design: every record
is also stored in the DHT, and verifiers re-publish fresh records periodically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.pubsub.pubsub import Pubsub

from trustswarm.protocol.errors import SignatureError
from trustswarm.protocol.identity import Identity

from .records import REPUTATION_TOPIC, ReputationRecord, SignedReputationRecord, sign_record
from .store import ReputationStore

log = logging.getLogger("trustswarm.reputation")
DEFAULT_PACE = 0.15  # seconds between publishes: ~6.7/s, under gossipsub's 10/s


class RecordPublisher:
    def __init__(
        self,
        host: IHost,
        dht: KadDHT | None,
        pubsub: Pubsub | None,
        identity: Identity,
        store: ReputationStore | None = None,
        pace_seconds: float = DEFAULT_PACE,
        put_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.dht = dht
        self.pubsub = pubsub
        self.identity = identity
        self.store = store
        self.pace_seconds = pace_seconds
        self.put_timeout = put_timeout
        self.gossiped = 0
        self.stored = 0
        self._next_slot = 0.0

    async def publish(self, records: Iterable[SignedReputationRecord | ReputationRecord]) -> int:
        """Sign (if needed), save, gossip and DHT-store each record; returns how many
        went out on gossip or into the DHT. Failures of either path are logged, not
        raised: the next round re-publishes."""
        sent = 0
        own = str(self.identity.peer_id)
        for item in records:
            signed = item if isinstance(item, SignedReputationRecord) else None
            if signed is None:
                signed = sign_record(self.identity, item)
            if signed.record.verifier_id != own:
                raise SignatureError("RecordPublisher only publishes its own verifier's records")
            await self._wait_for_slot()
            if self.store is not None:
                await trio.to_thread.run_sync(self.store.save_published, signed)
            data = signed.to_bytes()
            ok = False
            if self.pubsub is not None:
                try:
                    await self.pubsub.publish(REPUTATION_TOPIC(signed.record.model_id), data)
                    self.gossiped += 1
                    ok = True
                except Exception as exc:
                    log.warning("gossip publish of a reputation record failed: %s", exc)
            if self.dht is not None:
                try:
                    with trio.move_on_after(self.put_timeout):
                        await self.dht.put_value(signed.record.key, data)
                        self.stored += 1
                        ok = True
                except Exception as exc:
                    log.warning("DHT put of a reputation record failed: %s", exc)
            sent += ok
        return sent

    async def _wait_for_slot(self) -> None:
        now = trio.current_time()
        if self._next_slot > now:
            await trio.sleep(self._next_slot - now)
        self._next_slot = max(now, self._next_slot) + self.pace_seconds
