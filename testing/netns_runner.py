"""Testing only: several block servers in one process, driven over stdin/stdout.

An idle server costs ~400 MB of Python runtime (torch, transformers, libp2p), so a test
bed of 100 servers runs several tiny-model servers per process, one process per host:

    ip netns exec HOST python -m trustswarm.testing.netns_runner PLAN.json

PLAN.json: {"model": DIR, "listen_ip": "198.18.1.1", "initial_peers": [MULTIADDR...],
"servers": [{"span": [0, 3], "kind": "honest", "seed": 0}, ...]}. Kinds: see KINDS
(hostile ones come from trustswarm.testing). Every line out is one JSON object:
{"event": "up", "index", "peer_id", "addrs", "kind", "span"}, {"event": "down", "index"},
{"event": "stats", "rss_bytes", "cpu_seconds", "servers"}, {"event": "error", "message"}.
Commands in, one JSON object a line: {"cmd": "stop"|"start", "index": i}, {"cmd": "stats"};
end of input stops every server and the process.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio

from trustswarm.models.errors import ModelDirError
from trustswarm.models.store import ModelDir
from trustswarm.node.config import ServerConfig
from trustswarm.node.server import BlockServer
from trustswarm.protocol.identity import Identity
from trustswarm.testing.adversary import Tamper, adversarial_server_cls
from trustswarm.testing.hostile_records import hostile_record_server_cls
from trustswarm.testing.netns import TestBedError

log = logging.getLogger("trustswarm.testing.netns_runner")
KINDS = ("honest", "noise", "sybil", "records")
MAX_SERVERS = 64


@dataclass(frozen=True)
class ServerSpec:
    span: tuple[int, int]
    kind: str = "honest"
    seed: int = 0

    @classmethod
    def parse(cls, raw: object, num_blocks: int) -> ServerSpec:
        if not isinstance(raw, dict) or not isinstance(raw.get("span"), list):
            raise TestBedError(f"a server spec needs a span list, got {raw!r}")
        span = raw["span"]
        if len(span) != 2 or not all(type(b) is int for b in span):
            raise TestBedError(f"span must be two integers, got {span!r}")
        if not 0 <= span[0] < span[1] <= num_blocks:
            raise TestBedError(f"span {span} is not within the model's 0:{num_blocks}")
        kind, seed = raw.get("kind", "honest"), raw.get("seed", 0)
        if kind not in KINDS:
            raise TestBedError(f"unknown server kind {kind!r} (one of {KINDS})")
        if type(seed) is not int:
            raise TestBedError(f"seed must be an integer, got {seed!r}")
        return cls((span[0], span[1]), kind, seed)


def server_class(spec: ServerSpec) -> type[BlockServer]:
    """The class each kind runs as: hostile kinds are the attacks in trustswarm.testing."""
    if spec.kind == "noise":  # every answer 5 % noise, 20x boasted throughput
        return adversarial_server_cls(Tamper("noise", amount=0.05, seed=spec.seed), boast=20.0)
    if spec.kind == "sybil":  # a boasting Sybil: fresh identity, 100x, tampers 30 %
        tamper = Tamper("noise", amount=0.05, fraction=0.3, seed=spec.seed)
        return adversarial_server_cls(tamper, boast=100.0)
    if spec.kind == "records":  # serves honestly, spreads signed records with hostile fields
        return hostile_record_server_cls()
    return BlockServer


@dataclass
class Plan:
    model: Path
    listen_ip: str
    initial_peers: list[str]
    servers: list[ServerSpec]

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise TestBedError(f"cannot read plan {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise TestBedError("a plan is a JSON object")
        model = Path(str(raw.get("model", "")))
        try:
            num_blocks = ModelDir.open(model).num_blocks
        except ModelDirError as exc:
            raise TestBedError(f"plan {path}: {exc}") from None
        servers = raw.get("servers")
        if not isinstance(servers, list) or not 1 <= len(servers) <= MAX_SERVERS:
            raise TestBedError(f"a plan needs 1-{MAX_SERVERS} servers")
        peers = raw.get("initial_peers", [])
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            raise TestBedError("initial_peers must be a list of multiaddrs")
        return cls(
            model,
            str(raw.get("listen_ip", "127.0.0.1")),
            peers,
            [ServerSpec.parse(s, num_blocks) for s in servers],
        )


@dataclass
class Slot:
    spec: ServerSpec
    identity: Identity = field(default_factory=Identity.generate)
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None
    addrs: list[str] = field(default_factory=list)


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def process_stats(servers: int) -> dict[str, object]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {"rss_bytes": rss, "cpu_seconds": usage.ru_utime + usage.ru_stime, "servers": servers}


@dataclass
class Runner:
    plan: Plan
    model_dir: ModelDir
    slots: list[Slot]
    nursery: trio.Nursery

    def initial_peers(self, index: int) -> list[str]:
        """The plan's peers plus a few of this process's running servers (not `index`)."""
        mine = [s.addrs[0] for i, s in enumerate(self.slots) if i != index and s.addrs]
        return list(dict.fromkeys(self.plan.initial_peers + mine[:2]))

    async def start(self, index: int) -> None:
        slot = self.slots[index]
        if slot.addrs:
            return
        server = server_class(slot.spec)(
            identity=slot.identity,  # a restart keeps its peer id, as `node start` does
            model_dir=self.model_dir,
            config=ServerConfig(),
            span=slot.spec.span,
            dtype=torch.float32,
        )
        slot.scope, slot.stopped = trio.CancelScope(), trio.Event()
        listen = [f"/ip4/{self.plan.listen_ip}/tcp/0"]
        initial = self.initial_peers(index)

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                with slot.scope:
                    await server.serve(listen, initial, task_status=task_status)
            finally:
                slot.stopped.set()

        slot.addrs = await self.nursery.start(run)
        emit(
            "up",
            index=index,
            peer_id=str(slot.identity.peer_id),
            addrs=slot.addrs,
            kind=slot.spec.kind,
            span=list(slot.spec.span),
        )

    async def stop(self, index: int) -> None:
        slot = self.slots[index]
        if not slot.addrs:
            return
        slot.scope.cancel()
        with trio.move_on_after(10):
            await slot.stopped.wait()
        slot.addrs = []
        emit("down", index=index)

    async def command(self, line: str) -> None:
        try:
            cmd = json.loads(line)
            name, index = cmd.get("cmd"), cmd.get("index", 0)
        except (ValueError, AttributeError):
            emit("error", message=f"not a JSON command: {line[:80]!r}")
            return
        if name == "stats":
            emit("stats", **process_stats(sum(bool(s.addrs) for s in self.slots)))
        elif name in ("stop", "start") and type(index) is int and 0 <= index < len(self.slots):
            await (self.stop if name == "stop" else self.start)(index)
        else:
            emit("error", message=f"unknown command {line[:80]!r}")


async def serve_plan(plan: Plan) -> None:
    model_dir = ModelDir.open(plan.model)
    async with trio.open_nursery() as nursery:
        runner = Runner(plan, model_dir, [Slot(s) for s in plan.servers], nursery)

        async def start(index: int) -> None:
            try:
                await runner.start(index)
            except Exception as exc:  # one server that cannot start must not stop the rest
                emit("error", message=f"server {index} did not start: {exc}")

        await start(0)  # the others join through it (and the plan's initial peers)
        async with trio.open_nursery() as starting:
            for index in range(1, len(runner.slots)):
                starting.start_soon(start, index)
        emit("ready", servers=sum(bool(s.addrs) for s in runner.slots))
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                break
            await runner.command(line)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trustswarm.testing.netns_runner PLAN.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    try:
        plan = Plan.load(Path(args[0]))
    except TestBedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(serve_plan, plan)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
