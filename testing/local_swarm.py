"""Testing only: a real swarm on loopback, block servers in one background loop (for
integration tests and the in-process benchmarks)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio
from libp2p.custom_types import TProtocol

from trustswarm.client.loop import BackgroundLoop
from trustswarm.models.store import ModelDir
from trustswarm.node.config import ServerConfig
from trustswarm.node.server import BlockServer
from trustswarm.protocol.codec import Message, decode_message
from trustswarm.protocol.framing import read_frame, send_message
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host, parse_peer_addr

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@dataclass
class RunningServer:
    server: BlockServer
    addrs: list[str]
    scope: trio.CancelScope
    alive: bool = True
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def peer_id(self) -> str:
        return str(self.server.identity.peer_id)


@dataclass
class LocalSwarm:
    model_path: Path
    loop: BackgroundLoop = field(default_factory=lambda: BackgroundLoop("test-swarm"))
    servers: list[RunningServer] = field(default_factory=list)
    _nursery: trio.Nursery | None = None

    def __post_init__(self) -> None:
        self.model_dir = ModelDir.open(self.model_path)

        async def setup(nursery: trio.Nursery) -> None:
            self._nursery = nursery

        self.loop.start(setup)

    def start_server(
        self,
        span: tuple[int, int] | None,
        *,
        dtype: torch.dtype = torch.float32,
        config: ServerConfig | None = None,
        server_cls: type[BlockServer] = BlockServer,
        span_length: int | None = None,
        listen: str = LOOPBACK,
        **kwargs: object,
    ) -> RunningServer:
        server = server_cls(
            identity=Identity.generate(),
            model_dir=self.model_dir,
            config=config or ServerConfig(),
            span=span,
            span_length=span_length,
            dtype=dtype,
            **kwargs,
        )
        initial = self.initial_peers

        async def launch() -> RunningServer:
            scope = trio.CancelScope()

            stopped = trio.Event()

            async def run(task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    with scope:
                        await server.serve([listen], initial, task_status=task_status)
                finally:
                    stopped.set()

            addrs = await self._nursery.start(run)
            return RunningServer(server, addrs, scope, stopped=stopped)

        running = self.loop.run(launch)
        self.servers.append(running)
        return running

    async def start_task(self, run: Callable[..., Awaitable[object]], *args: object) -> object:
        """`nursery.start(run, *args)` in the swarm's loop (from inside `self.loop.run`)."""
        if self._nursery is None:
            raise RuntimeError("the swarm's loop is not running")
        return await self._nursery.start(run, *args)

    @property
    def initial_peers(self) -> list[str]:
        return [s.addrs[0] for s in self.servers if s.alive][:3]

    def kill(self, running: RunningServer) -> None:
        """Stop a server abruptly: its host closes, every stream to it breaks."""
        running.alive = False

        async def cancel() -> None:
            running.scope.cancel()
            with trio.move_on_after(10):
                await running.stopped.wait()
            if not running.stopped.is_set():
                raise RuntimeError(f"server {running.peer_id} did not stop within 10 s")

        self.loop.run(cancel)

    def close(self) -> None:
        self.loop.close()


def raw_exchange(
    swarm: LocalSwarm, target: RunningServer, protocol: str, frames: list[bytes | Message]
) -> list[dict[str, str]]:
    """Act as a bare peer: send each frame (raw bytes or a Message) on its own
    stream to `target` and return the metadata of each reply."""

    async def run() -> list[dict[str, str]]:
        host = make_host(Identity.generate())
        replies = []
        async with host.run(listen_addrs=[]):
            info = parse_peer_addr(target.addrs[0])
            await host.connect(info)
            for frame in frames:
                stream = await host.new_stream(info.peer_id, [TProtocol(protocol)])
                if isinstance(frame, Message):
                    await send_message(stream, frame)
                else:
                    await stream.write(frame)
                with trio.fail_after(10):
                    reply = decode_message(await read_frame(stream))
                replies.append(reply.meta)
        return replies

    return swarm.loop.run(run)
