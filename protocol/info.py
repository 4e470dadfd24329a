"""The info RPC, client side: a server's signed announcement and what it knows."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from .announcement import SignedAnnouncement
from .codec import Message
from .errors import ProtocolError, SignatureError
from .framing import close_quietly, raise_if_error, receive_message, send_message
from .limits import DEFAULT_LIMITS, Limits
from .protocols import INFO


@dataclass(frozen=True)
class ServerInfo:
    announcement: SignedAnnouncement
    known: list[SignedAnnouncement]
    active_sessions: int
    rtt: float


async def call_info(
    host: IHost, peer_id: ID, timeout: float, limits: Limits = DEFAULT_LIMITS
) -> ServerInfo:
    with trio.fail_after(timeout):
        stream = await host.new_stream(peer_id, [INFO])
    # The RTT excludes opening the stream (several round trips in py-libp2p): routes
    # are costed for requests on streams that are already open.
    began = time.perf_counter()
    try:
        with trio.fail_after(timeout):
            await send_message(stream, Message(), limits)
            answer, _ = await receive_message(stream, limits)
    finally:
        await close_quietly(stream)
    rtt = time.perf_counter() - began
    raise_if_error(answer)
    try:
        info = json.loads(answer.field("info"))
        signed = SignedAnnouncement.from_bytes(info["announcement"].encode())
        known = []
        for item in info.get("known", [])[:256]:
            try:
                known.append(SignedAnnouncement.from_bytes(item.encode()))
            except ProtocolError:
                continue
        active = int(info.get("active_sessions", 0))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ProtocolError("malformed info answer") from None
    signed.verify()
    if signed.announcement.peer_id != str(peer_id):
        raise SignatureError("server announced itself under another peer id")
    return ServerInfo(signed, known, active, rtt)
