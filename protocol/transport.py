"""libp2p hosts: TCP + yamux + Noise only, optionally in a private swarm (pnet)."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto import x25519
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from .errors import IdentityError, ProtocolError, SwarmError
from .identity import Identity

log = logging.getLogger("trustswarm.transport")
CONNECT_TIMEOUT = 10.0
_PSK = re.compile(r"^[0-9a-fA-F]{64}$")


def make_host(
    identity: Identity, swarm_key: str | None = None, announce_addrs: Sequence[str] = ()
) -> IHost:
    """A host whose only security protocol is Noise.

    py-libp2p also offers plaintext by default, where a dialer can claim any peer
    id; restricting to Noise makes the remote peer id authenticated. One connection
    per peer avoids the 250 ms "happy eyeballs" wait in connect(). `announce_addrs`
    replace the listen addresses in what identify and the DHT tell other peers.
    """
    noise = NoiseTransport(
        identity.key_pair, noise_privkey=x25519.create_new_key_pair().private_key
    )
    return new_host(
        key_pair=identity.key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_preference="YAMUX",
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        psk=swarm_key,
        announce_addrs=[parse_multiaddr(a) for a in announce_addrs] or None,
    )


def load_swarm_key(path: str | Path) -> str:
    """Read a private-swarm pre-shared key: 64 hex characters (32 bytes).

    Also accepts the go-libp2p swarm.key layout (/key/swarm/psk/1.0.0/, /base16/, key).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise IdentityError(f"cannot read swarm key {path}: {exc}") from None
    candidates = [line.strip() for line in text.splitlines() if line.strip()]
    key = candidates[-1] if candidates else ""
    if not _PSK.match(key):
        raise IdentityError(f"swarm key {path} must hold 64 hex characters (32 random bytes)")
    return key.lower()


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:
        raise ProtocolError(f"not a multiaddr: {text!r} ({exc})") from None


def parse_peer_addr(text: str) -> PeerInfo:
    """A full peer address, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo..."""
    addr = parse_multiaddr(text)
    try:
        return info_from_p2p_addr(addr)
    except Exception as exc:
        raise ProtocolError(f"multiaddr {text!r} has no /p2p/<peer id> part ({exc})") from None


async def connect_peers(
    host: IHost, dht: KadDHT | None, addrs: Sequence[str], timeout: float = CONNECT_TIMEOUT
) -> int:
    """Dial every initial peer (bounded in time); returns how many answered.

    Raises SwarmError when peers were given and none could be reached: with a wrong
    private-swarm key py-libp2p only refuses after ~40 s, so we bound each dial.
    """
    infos = [parse_peer_addr(a) for a in addrs]
    connected = 0
    for info in infos:
        with trio.move_on_after(timeout):
            try:
                await host.connect(info)
            except Exception as exc:
                log.warning("cannot reach initial peer %s: %s", info.peer_id, exc)
                continue
            connected += 1
            if dht is not None:
                await dht.add_peer(info.peer_id)
    if infos and not connected:
        raise SwarmError(
            f"none of the {len(infos)} initial peers answered within {timeout:.0f} s "
            "(wrong address, peer down, or a different --swarm-key?)"
        )
    if dht is not None and connected:
        with trio.move_on_after(timeout):
            await dht.refresh_routing_table()
    return connected


def refuse_shared_port(addr: multiaddr.Multiaddr) -> None:
    """Raise SwarmError if a fixed TCP listen port is already taken.

    py-libp2p listens with SO_REUSEPORT (for hole punching), so a second node started
    by the same user on a busy port binds it too, and the kernel then splits incoming
    connections between the two processes. A plain bind, without SO_REUSEPORT, fails
    on a port any socket holds, which is the check we want.
    """
    try:
        port = int(addr.value_for_protocol("tcp"))
    except Exception:  # noqa: S112 - not a TCP address: nothing to check
        return
    if port == 0:
        return
    for family, proto in ((socket.AF_INET, "ip4"), (socket.AF_INET6, "ip6")):
        try:
            ip = addr.value_for_protocol(proto)
        except Exception:  # noqa: S112 - the other family
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR so a restart is not refused for the old sockets' TIME_WAIT;
            # Linux still refuses it while another socket listens on the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as exc:
                raise SwarmError(f"cannot listen on {addr}: {exc.strerror}") from exc


@asynccontextmanager
async def running_host(
    host: IHost, listen_addrs: Sequence[multiaddr.Multiaddr]
) -> AsyncIterator[IHost]:
    """`host.run()` that also closes the network on exit.

    py-libp2p 0.8.1 leaves its listeners and connections open when `host.run()`
    exits, so a stopped in-process node would go on accepting connections and
    answering streams. Closing the swarm explicitly makes "stopped" mean stopped.
    """
    for addr in listen_addrs:
        refuse_shared_port(addr)
    try:
        async with host.run(listen_addrs=listen_addrs):
            yield host
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await host.get_network().close()
            except Exception as exc:  # best effort: the process may be exiting anyway
                log.debug("closing the libp2p network failed: %s", exc)
