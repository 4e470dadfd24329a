"""Sending fraud evidence to a verifier (`/trustswarm/report/1`).

A client that caught a disagreement (redundancy) hands the `DisagreementReport` to a
verifier it trusts; the verifier recomputes and, if a signed answer was wrong, bans its
signer. See verifier/reports.py for the verifier's side and the wire format.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from trustswarm.protocol import protocols
from trustswarm.protocol.codec import Message
from trustswarm.protocol.errors import ProtocolError
from trustswarm.protocol.evidence import DisagreementReport
from trustswarm.protocol.framing import raise_if_error, receive_message, write_frame
from trustswarm.protocol.identity import parse_peer_id
from trustswarm.protocol.transport import parse_peer_addr

from .rpc import close_quietly, open_stream

VERDICTS = ("upheld", "rejected", "rate_limited")


@dataclass(frozen=True)
class ReportVerdict:
    verdict: str  # "upheld" | "rejected" | "rate_limited"
    detail: str
    banned: tuple[str, ...]

    @property
    def upheld(self) -> bool:
        return self.verdict == "upheld"


async def send_report(
    host: IHost,
    verifier_peer_id: ID | str,
    report: DisagreementReport | bytes,
    timeout: float = 120.0,
) -> ReportVerdict:
    """Send one report and wait for the verdict (the verifier recomputes: allow time).

    `verifier_peer_id` is a peer id the host can already reach (connected, or in its
    peerstore) or a full multiaddr (…/p2p/<peer id>), which is dialled first.
    Raises RemoteError when the verifier refuses the input (bad_request, too_large).
    """
    data = report.to_bytes() if isinstance(report, DisagreementReport) else bytes(report)
    answer = await send_frame(host, verifier_peer_id, protocols.REPORT, data, timeout)
    verdict = answer.meta.get("verdict", "")
    if verdict not in VERDICTS:
        raise ProtocolError(f"verifier answered an unknown verdict {verdict[:40]!r}")
    banned = tuple(p for p in answer.meta.get("banned", "").split(",") if p)
    return ReportVerdict(verdict, answer.meta.get("detail", ""), banned)


async def send_frame(
    host: IHost, verifier: ID | str, protocol: TProtocol, data: bytes, timeout: float
) -> Message:
    """One frame to a verifier on `protocol`, one answer back (an error frame raises
    RemoteError). `verifier`: a peer id the host can reach or a full multiaddr."""
    if isinstance(verifier, str) and "/p2p/" in verifier:
        info = parse_peer_addr(verifier)
        with trio.fail_after(timeout):
            await host.connect(info)
        verifier = info.peer_id
    peer = verifier if isinstance(verifier, ID) else parse_peer_id(verifier)
    stream = await open_stream(host, peer, protocol, timeout)
    try:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                # Write while reading: a verifier may answer (rate_limited) without reading.
                async def write() -> None:
                    try:
                        await write_frame(stream, data)
                    except Exception:  # noqa: S110 - the answer tells what happened
                        pass

                nursery.start_soon(write)
                answer, _ = await receive_message(stream)
                nursery.cancel_scope.cancel()
    finally:
        await close_quietly(stream)
    return raise_if_error(answer)
