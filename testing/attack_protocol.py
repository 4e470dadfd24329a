"""Protocol attacks against real nodes: forged and misplaced signatures, announcements
in another peer's name, bad reputation records, a Sybil flood, a false fraud report.

Each function returns a ProtocolRow: what was tried, whether the real nodes (servers,
verifier, client) refused it and how we observed that, and the wrong tokens that
reached a client's output.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from trustswarm.client import DistributedModelForCausalLM
from trustswarm.client.reports import send_report
from trustswarm.protocol.announcement import (
    Announcement,
    SignedAnnouncement,
    announcement_key,
    sign_announcement,
)
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host, parse_peer_addr, running_host
from trustswarm.reputation.gossip import running_pubsub
from trustswarm.reputation.records import (
    REPUTATION_TOPIC,
    ReputationRecord,
    SignedReputationRecord,
    sign_record,
)
from trustswarm.testing.adversary import Tamper, adversarial_server_cls
from trustswarm.testing.attack_env import (
    FIRST,
    Env,
    generate_all,
    introduce,
    learn,
    prefer,
    wait_for,
)
from trustswarm.testing.attack_output import verifier_phase
from trustswarm.testing.forging_servers import forging_server_cls
from trustswarm.testing.local_verifier import RunningVerifier
from trustswarm.verifier.probe import probe
from trustswarm.verifier.reports import evidence_report

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


@dataclass
class ProtocolRow:
    attack: str
    rejected: bool  # every real node that saw it refused it (see `how`)
    how: str
    wrong: int = 0  # wrong tokens that reached a client's output
    tokens: int = 0
    seconds: float | None = None  # time to exclusion, where that applies
    extra: dict = field(default_factory=dict)


# -- signing attacks -------------------------------------------------------------------


def signing_attack(
    env: Env,
    verifier: RunningVerifier,
    mode: str,
    client: DistributedModelForCausalLM,
    verifier_timeout: float,
) -> ProtocolRow:
    label = {
        "forged_signature": "forged signature (wrong answer signed by another key)",
        "other_request": "statement signed for another request",
    }[mode]
    server = env.swarm.start_server(FIRST, server_cls=forging_server_cls(mode))
    began = time.monotonic()
    try:
        vres = verifier_phase(env, verifier, server, began, verifier_timeout)
        learn(client, [server])
        wrong, tokens, failed = generate_all(
            client, env.prompts, lambda: prefer(client, server.peer_id)
        )
        ban = client.swarm.view.bans.get(server.peer_id)
        reason = ban.reason if ban else ""
        expected = "signature" if mode == "forged_signature" else "request_digest"
        rejected = ban is not None and expected in reason and server.server.ctx.answers > 0
        return ProtocolRow(
            label,
            rejected and failed == 0,
            f"client (redundancy=1) refused the answer and banned the server: {reason[:120]!r}; "
            f"verifier: {'excluded' if vres.detected else 'not excluded'} "
            f"({vres.checks_of_adversary} checks, a failed check is a failure, not a ban)",
            wrong + vres.wrong,
            tokens + vres.tokens,
            vres.seconds,
            {"answers_sent": server.server.ctx.answers, "verifier": vres.__dict__},
        )
    finally:
        env.swarm.kill(server)


# -- an attacker's own node ------------------------------------------------------------


async def _attacker_node(
    identity: Identity,
    peers: list[str],
    stop: trio.Event,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """A libp2p host with a DHT (no validators: it stores anything) and gossipsub,
    connected to `peers`; hands (host, dht, pubsub) to the caller until `stop`."""
    host = make_host(identity)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(running_host(host, [LOOPBACK]))
        pubsub = await stack.enter_async_context(running_pubsub(host))
        dht = KadDHT(host, DHTMode.SERVER)
        await stack.enter_async_context(background_trio_service(dht))
        for addr in peers:
            with trio.move_on_after(10):
                await host.connect(parse_peer_addr(addr))
        task_status.started((host, dht, pubsub))
        await stop.wait()


class Attacker:
    def __init__(self, env: Env, peers: list[str]) -> None:
        self.env = env
        self.identity = Identity.generate()
        self.stop = trio.Event()

        async def launch():  # noqa: ANN202
            return await env.swarm.start_task(_attacker_node, self.identity, peers, self.stop)

        self.host, self.dht, self.pubsub = env.swarm.loop.run(launch)

    def store_at(self, peer: str, key: str, value: bytes) -> bool:
        async def run() -> bool:
            with trio.move_on_after(10):
                return await self.dht.value_store._store_at_peer(
                    ID.from_base58(peer), key.encode(), value
                )
            return False

        return self.env.swarm.loop.run(run)

    def gossip(self, topic: str, value: bytes) -> None:
        self.env.swarm.loop.run(self.pubsub.publish, topic, value)

    def close(self) -> None:
        async def stop() -> None:
            self.stop.set()
            await trio.sleep(0.1)

        self.env.swarm.loop.run(stop)


def _node_dhts(env: Env, verifier: RunningVerifier) -> list[tuple[str, KadDHT]]:
    nodes = [(s.peer_id, s.server.dht) for s in env.swarm.servers if s.alive]
    return [*nodes, (verifier.peer_id, verifier.verifier.dht)]


def announcement_attack(env: Env, verifier: RunningVerifier) -> ProtocolRow:
    """Put announcements for an honest server's key, made by someone else, on every node."""
    victim = env.honest[0]
    model_id = env.swarm.model_dir.manifest.model_id
    key = announcement_key(model_id, victim.peer_id)
    genuine = victim.server.announcement.announcement
    attacker = Attacker(env, [s.addrs[0] for s in env.swarm.servers if s.alive][:4])
    try:
        now = time.time()
        fake_addrs = tuple(str(a).split("/p2p/")[0] for a in attacker.host.get_addrs())
        in_name = Announcement(
            **{**genuine.__dict__, "addrs": fake_addrs, "issued_at": now, "expires_at": now + 300}
        )
        forged = SignedAnnouncement(in_name, attacker.identity.sign(in_name.canonical_bytes()))
        own = sign_announcement(
            attacker.identity,
            Announcement(**{**in_name.__dict__, "peer_id": str(attacker.identity.peer_id)}),
        )
        bad = [forged.to_bytes(), own.to_bytes()]
        nodes = _node_dhts(env, verifier)
        delivered = sum(attacker.store_at(peer, key, value) for peer, _ in nodes for value in bad)
        stored_bad = [
            peer
            for peer, dht in nodes
            if (rec := dht.value_store.get(key.encode())) is not None and rec.value in bad
        ]
        # A client reading the swarm keeps the victim's own addresses.
        with DistributedModelForCausalLM.from_pretrained(
            env.model_dir, env.swarm.initial_peers
        ) as client:
            learn(client, [victim])
            seen = client.swarm.view.servers[victim.peer_id]
            kept = set(seen.addrs) == set(genuine.addrs)
        return ProtocolRow(
            "DHT announcement in another peer's name",
            not stored_bad and kept,
            f"pushed 2 forgeries (victim's name signed by the attacker; attacker's record "
            f"under the victim's key) to {len(nodes)} real nodes' DHTs "
            f"({delivered} stores answered); nodes holding a forgery: {len(stored_bad)}; "
            f"a client still sees the victim at its own address: {kept}",
            extra={"nodes": len(nodes), "stored_bad": stored_bad},
        )
    finally:
        attacker.close()


# -- reputation records ----------------------------------------------------------------


def _record(
    signer: Identity,
    verifier_id: str,
    subject: str,
    model_id: str,
    state: str,
    sequence: int,
    issued_at: float,
    ttl: float,
) -> SignedReputationRecord:
    record = ReputationRecord(
        verifier_id=verifier_id,
        subject=subject,
        model_id=model_id,
        start=0,
        end=6,
        score=0.0 if state == "banned" else 0.9,
        state=state,
        passes=0 if state == "banned" else 9,
        failures=3 if state == "banned" else 0,
        issued_at=issued_at,
        expires_at=issued_at + ttl,
        sequence=sequence,
    )
    if verifier_id == str(signer.peer_id):
        return sign_record(signer, record)
    return SignedReputationRecord(record, signer.sign(record.canonical_bytes()))  # forged


def record_attacks(env: Env, verifier: RunningVerifier) -> list[ProtocolRow]:
    """Bad records about an honest server, sent over gossip and into every node's DHT;
    then a genuine record the same way (proof the path delivers)."""
    v = verifier.verifier
    model_id = v.model_id
    victim = env.honest[1].peer_id
    rogue = Identity.generate()  # an untrusted verifier
    trusting = env.client(1, trusted_verifiers=[verifier.peer_id])
    both = env.client(1, trusted_verifiers=[verifier.peer_id, str(rogue.peer_id)])
    attacker = Attacker(env, [s.addrs[0] for s in env.swarm.servers if s.alive][:4])
    topic = REPUTATION_TOPIC(model_id)
    rows: list[ProtocolRow] = []
    try:
        trust = trusting.swarm.view.trust
        # The client must already hold a genuine record of the victim (sequence n).
        wait_for(lambda: trust.current(victim), 60)
        held = trust.records.get((verifier.peer_id, victim))
        held_seq = held.record.sequence if held else 0
        now = time.time()
        cases = {
            "forged reputation record (verifier's name, another key)": _record(
                rogue, verifier.peer_id, victim, model_id, "banned", 10**9, now, 300
            ),
            "expired reputation record (genuinely signed)": _record(
                v.identity, verifier.peer_id, victim, model_id, "banned", 10**9, now - 1000, 300
            ),
            "replayed older reputation record (genuinely signed)": _record(
                v.identity,
                verifier.peer_id,
                victim,
                model_id,
                "banned",
                max(held_seq - 1, 0),
                now,
                300,
            ),
            "record from an untrusted verifier": _record(
                rogue, str(rogue.peer_id), victim, model_id, "banned", 1, now, 300
            ),
        }
        nodes = _node_dhts(env, verifier)
        # A replay is refused by a node that holds the newer record. The verifier's own
        # puts reach nodes at its republish pace, so deliver the genuine record the
        # client holds to every node first, as honest propagation would.
        if held is not None:
            for peer, _ in nodes:
                attacker.store_at(peer, held.record.key, held.to_bytes())
        for signed in cases.values():
            data = signed.to_bytes()
            attacker.gossip(topic, data)
            for peer, _ in nodes:
                attacker.store_at(peer, signed.record.key, data)
        # Control: a genuine fresh record, the same way; the trusting client takes it.
        control = v.record_for(victim)
        attacker.gossip(topic, control.to_bytes())
        arrived = wait_for(
            lambda: (
                (r := trust.records.get((verifier.peer_id, victim))) is not None
                and r.record.sequence >= control.record.sequence
            ),
            20,
        )
        # The client that also trusts the rogue does see the rogue's record (delivery).
        both_excluded = wait_for(lambda: not both.swarm.view.trust.allowed(victim), 20)
        for name, signed in cases.items():
            data = signed.to_bytes()
            stored_bad = [
                p
                for p, dht in nodes
                if (rec := dht.value_store.get(signed.record.key.encode())) is not None
                and rec.value == data
            ]
            untrusted = name.startswith("record from an untrusted")
            allowed = trust.allowed(victim) and not trust.banned(victim)
            if untrusted:
                ok = allowed and (str(rogue.peer_id), victim) not in trust.records
                how = (
                    f"valid signature, so nodes may store it ({len(stored_bad)}/{len(nodes)} "
                    f"do); the client trusting only the real verifier ignores it (victim "
                    f"still allowed: {allowed}); a client that trusts the rogue excluded the "
                    f"victim: {both_excluded is not None} (proof of delivery)"
                )
            else:
                ok = allowed and not stored_bad
                how = (
                    f"sent on gossip and pushed into {len(nodes)} real nodes' DHTs: nodes "
                    f"storing it: {len(stored_bad)}; trusting client still allows the "
                    f"victim: {allowed}; a genuine record sent the same way arrived: "
                    f"{arrived is not None}"
                )
            rows.append(ProtocolRow(name, ok and arrived is not None, how))
        return rows
    finally:
        attacker.close()
        trusting.close()
        both.close()


# -- Sybil flood -----------------------------------------------------------------------


def sybil_flood(
    env: Env,
    verifier: RunningVerifier,
    count: int = 10,
    seconds: float = 20.0,
    ban_wait: float = 60.0,
) -> ProtocolRow:
    """`count` new identities (cheating: 5 % noise, boasting 100x speed) announce blocks
    0:3 at once; a client trusting the verifier keeps generating (natural routing)."""
    v = verifier.verifier
    honest = [s.peer_id for s in env.honest]
    established = wait_for(
        lambda: all(
            (r := verifier.store.get(p, v.model_id)) is not None and r.state == "ok" for p in honest
        ),
        180,
    )
    client = env.client(1, trusted_verifiers=[verifier.peer_id])
    sybils = []
    try:
        learn(client, env.honest)
        wait_for(lambda: all(client.swarm.view.trust.state(p) == "ok" for p in honest), 30)
        began = time.monotonic()
        for i in range(count):
            tamper = Tamper("noise", amount=0.05, seed=100 + i)
            sybils.append(
                env.swarm.start_server(FIRST, server_cls=adversarial_server_cls(tamper, 100.0))
            )
        started = time.monotonic() - began
        introduce(client, sybils)
        learned = len({s.peer_id for s in sybils} & set(client.swarm.view.servers))
        me = str(client.swarm.host.get_id())
        one = env.prompts.first(1)
        wrong = tokens = routes = sybil_routes = forwards = 0
        view = client.swarm.view
        sybil_ids = {s.peer_id for s in sybils}
        flooded = time.monotonic()
        while routes == 0 or time.monotonic() - flooded < seconds:
            route = [h.server.peer_id for h in view.inference_route(0, 6)]
            routes += 1
            sybil_routes += bool(sybil_ids & set(route))
            w, t, _ = generate_all(client, one)
            wrong, tokens = wrong + w, tokens + t
        served_inference = sum(me in s.server.ctx.seen for s in sybils)
        # Plain forward passes route by announced throughput x reputation weight.
        hits = 0
        for _ in range(20):
            route = [h.server.peer_id for h in view.forward_route(0, 6)]
            hits += bool(sybil_ids & set(route))
            forwards += 1
        banned_all = wait_for(
            lambda: all(
                (r := verifier.store.get(p, v.model_id)) is not None and r.state == "banned"
                for p in sybil_ids
            ),
            max(0.0, ban_wait - (time.monotonic() - flooded)),
        )
        banned = sum(
            (r := verifier.store.get(p, v.model_id)) is not None and r.state == "banned"
            for p in sybil_ids
        )

        # Once the client holds the bans: no route may touch a banned Sybil.
        def n_excluded() -> int:
            return sum(not view.trust.allowed(p) for p in sybil_ids)

        # Gossip is best effort and the verifier publishes (gossip + DHT put) one record
        # at a time; the client's periodic refresh reads the DHT (done here every 5 s).
        waited, by_gossip = time.monotonic(), None
        while n_excluded() < banned and time.monotonic() - waited < 45:
            wait_for(lambda: n_excluded() >= banned, 5)
            by_gossip = n_excluded() if by_gossip is None else by_gossip
            if n_excluded() < banned:
                client.run_async(client.swarm.refresh)
        by_gossip = n_excluded() if by_gossip is None else by_gossip
        held_after = time.monotonic() - waited
        excluded = {p for p in sybil_ids if not view.trust.allowed(p)}
        after = [h.server.peer_id for _ in range(20) for h in view.inference_route(0, 6)]
        after += [h.server.peer_id for _ in range(20) for h in view.forward_route(0, 6)]
        after_hits = sum(p in excluded for p in after)
        w, t, _ = generate_all(client, one)
        ok = sybil_routes == 0 and served_inference == 0 and wrong == 0
        return ProtocolRow(
            f"Sybil flood: {count} new identities announce blocks 0:3 at once",
            ok,
            f"honest servers established (verifier state ok) after "
            f"{_secs(established)} s; {count} cheating Sybils (5 % noise) boasting 100x speed "
            f"started in {started:.1f} s ({learned} known to the client). While on "
            f"probation: inference routes (latency + probation penalty) through a Sybil: "
            f"{sybil_routes}/{routes}, Sybils that served the client's generations: "
            f"{served_inference}/{count}; plain forward routes (throughput x reputation "
            f"weight) through a Sybil: {hits}/{forwards}. Banned by the verifier: "
            f"{banned}/{count} within {_secs(banned_all)} s of the flood; bans held by the "
            f"client: {by_gossip} over gossip within 5 s, {len(excluded)} after "
            f"{held_after:.0f} s (with DHT refreshes); then routes through a banned Sybil {after_hits}/40, wrong "
            f"tokens {w}/{t}",
            wrong,
            tokens,
            extra={
                "inference_routes": routes,
                "inference_routes_via_sybil": sybil_routes,
                "sybils_served_client": served_inference,
                "forward_routes": forwards,
                "forward_routes_via_sybil": hits,
                "sybils_banned": banned,
                "sybils_known": learned,
                "established_after": established,
                "excluded_by_client": len(excluded),
                "excluded_by_gossip": by_gossip,
                "routes_after_bans_via_banned": after_hits,
                "wrong_after_bans": w,
            },
        )
    finally:
        client.close()
        for s in sybils:
            env.swarm.kill(s)


def _secs(value: float | None) -> str:
    return "timeout" if value is None else f"{value:.1f}"


# -- false fraud report ----------------------------------------------------------------


def false_report(env: Env, verifier: RunningVerifier) -> ProtocolRow:
    """A client accuses an honest server, sending its genuine (correct) signed answers as
    evidence; the verifier recomputes and must change nothing about the server.
    (Forged evidence under an honest name: tests/test_verifier_reports.py.)"""
    v = verifier.verifier
    victim = env.honest[2]
    model_id = v.model_id
    before = verifier.store.get(victim.peer_id, model_id)

    async def evidence():  # noqa: ANN202
        challenge = await v.compute(v.checker.factory.make, 0, 3, 3)
        ann = v.view.servers[victim.peer_id]
        async with v.checker.pool.lease() as checker:  # a client of the swarm
            return await probe(checker.swarm, ann, challenge, "inference")

    async def send(report):  # noqa: ANN001, ANN202
        host = make_host(Identity.generate())
        async with running_host(host, []):
            await host.connect(parse_peer_addr(verifier.addrs[0]))
            return await send_report(host, verifier.peer_id, report, timeout=60.0)

    honest_evidence = env.swarm.loop.run(evidence)
    report = evidence_report(model_id, 0, 3, "inference", honest_evidence, "accused by a liar")
    verdict = env.swarm.loop.run(send, report)
    after = verifier.store.get(victim.peer_id, model_id)
    failures_before = before.failures if before else 0
    unhurt = after is None or (after.state != "banned" and after.failures == failures_before)
    with DistributedModelForCausalLM.from_pretrained(
        env.model_dir, env.swarm.initial_peers, trusted_verifiers=[verifier.peer_id]
    ) as client:
        learn(client, [victim])
        time.sleep(1.0)
        allowed = client.swarm.view.trust.allowed(victim.peer_id)
    return ProtocolRow(
        "false fraud report against an honest server",
        verdict.verdict == "rejected" and unhurt and allowed,
        f"verifier verdict: {verdict.verdict} ({verdict.detail[:100]!r}); the server's "
        f"failures before/after: {failures_before}/{after.failures if after else 0}, state "
        f"{after.state if after else 'unknown'}; a trusting client still routes to it: {allowed}",
    )
