"""The server side of the discover RPC (protocol/discovery.py)."""

from __future__ import annotations

from collections.abc import Callable

import trio
from libp2p.abc import INetStream

from trustswarm.protocol.discovery import DiscoveryPage, DiscoveryQuery
from trustswarm.protocol.framing import receive_message

from .handlers import Handler, ServingContext, send_answer


def discovery_handler(answer: Callable[[DiscoveryQuery], DiscoveryPage]) -> Handler:
    """A stream handler (for `guarded`) answering one discover request per stream.
    A malformed request raises ProtocolError, which `guarded` turns into an error frame."""

    async def handle(ctx: ServingContext, stream: INetStream) -> None:
        with trio.fail_after(ctx.config.request_timeout):
            request, _ = await receive_message(stream, ctx.config.limits)
        page = answer(DiscoveryQuery.from_message(request))
        await send_answer(ctx, stream, page.to_message())

    return handle
