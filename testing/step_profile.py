"""Testing and benchmarks only: where a generation step's time goes, per category.

`bench/generation.py --profile` prints it (bench/generation_profile.py). Installed by
patching the running processes; nothing in the product changes or is timed without it:

* the client (this process): embedding and LM head (module hooks), codec (encode /
  decode), signature checks (ed25519 verify), digests and chain links, stream writes,
  waiting for answers (stream reads), and the step's wall time (embedding to embedding);
* each server (`python -m trustswarm.testing.step_profile TALLY.json node start ...`):
  codec, digests, signing, the thread hop into compute, the runner (its mask / rotary /
  cache overhead apart from the blocks), each block, and stream writes. The server
  writes its tally when it exits (SIGTERM).

Functions are replaced wherever a trustswarm module imported them by name (e.g. the
codec functions that framing, chained frames and sessions each import), so the profile
follows code paths that change (client-driven hops, chaining, batching) without naming
them. Every timing is filed under the kind of step it belongs to: "decode" (one new
token), "prefill" (several) or "other" (info requests, discovery).
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import importlib
import json
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Protocol

DECODE, PREFILL, OTHER = "decode", "prefill", "other"
# Modules whose names the profile patches (imported first so that their `from x import
# f` copies exist); missing ones are skipped (the tree may not have them yet).
MODULES = (
    "trustswarm.protocol.framing",
    "trustswarm.protocol.chained",
    "trustswarm.protocol.evidence",
    "trustswarm.protocol.info",
    "trustswarm.client.rpc",
    "trustswarm.client.session",
    "trustswarm.client.chained_session",
    "trustswarm.client.replicas",
    "trustswarm.client.model",
    "trustswarm.node.handlers",
    "trustswarm.node.forwarding",
    "trustswarm.node.step_batcher",
    "trustswarm.node.server",
    "trustswarm.models.batched_step",
    "trustswarm.models.runner",
)


class Sink(Protocol):
    """Where timings go: a Tally, or a ClientProfile (which forwards while enabled)."""

    def add(self, kind: str, category: str, seconds: float) -> None: ...


# What a patch did not find (a function renamed or moved): printed by install, so that a
# profile with zeros in it says why.
MISSING: list[str] = []


@dataclass
class Tally:
    """Seconds and call counts per (kind of step, category); thread-safe enough for
    the bench (one lock, held for a dict update)."""

    seconds: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    calls: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, category: str, seconds: float) -> None:
        with self._lock:
            by_kind = self.seconds[kind]
            by_kind[category] = by_kind.get(category, 0.0) + seconds
            counts = self.calls[kind]
            counts[category] = counts.get(category, 0) + 1

    def count(self, kind: str, category: str) -> None:
        self.add(kind, category, 0.0)

    def clear(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()

    def to_json(self) -> dict:
        with self._lock:
            return {"seconds": dict(self.seconds), "calls": dict(self.calls)}

    @classmethod
    def from_json(cls, data: dict) -> Tally:
        tally = cls()
        for kind, cats in data.get("seconds", {}).items():
            tally.seconds[kind] = dict(cats)
        for kind, cats in data.get("calls", {}).items():
            tally.calls[kind] = dict(cats)
        return tally

    def ms(self, kind: str, category: str, per: int) -> float:
        return 1000.0 * self.seconds.get(kind, {}).get(category, 0.0) / max(per, 1)


# -- patching -------------------------------------------------------------------------


def import_all() -> None:
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def patch_everywhere(original: object, replacement: object) -> int:
    """Replace `original` in every loaded trustswarm module that holds it by name."""
    n = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "trustswarm" or name.startswith("trustswarm.")):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)
                n += 1
    return n


_DEPTH = threading.local()


def timed_sync(fn: Callable, tally: Sink, category: str, kind: Callable[[], str]) -> Callable:
    """`fn` timed into `category`; nested calls of the same category count once."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        depth = getattr(_DEPTH, category, 0)
        if depth:
            return fn(*args, **kwargs)
        setattr(_DEPTH, category, 1)
        began = perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(_DEPTH, category, 0)
            tally.add(kind(), category, perf_counter() - began)

    return wrapper


def timed_async(fn: Callable, tally: Sink, category: str, kind: Callable[[], str]) -> Callable:
    @functools.wraps(fn)
    async def wrapper(*args: object, **kwargs: object) -> object:
        began = perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            tally.add(kind(), category, perf_counter() - began)

    return wrapper


def _patch_function(module: str, name: str, make: Callable[[Callable], Callable]) -> None:
    try:
        original = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        MISSING.append(f"{module}.{name}")
        return
    patch_everywhere(original, make(original))


def _patch_method(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    original = cls.__dict__.get(name)
    if original is None:
        MISSING.append(f"{cls.__module__}.{cls.__name__}.{name}")
    else:
        setattr(cls, name, make(original))


def _report_missing(side: str) -> None:
    if MISSING:
        print(f"step profile ({side}): not found, not timed: {', '.join(MISSING)}", file=sys.stderr)


def kind_of_message(message: object) -> str | None:
    """decode / prefill for a message carrying hidden states; None otherwise."""
    tensors = getattr(message, "tensors", None) or {}
    hidden = tensors.get("hidden_states")
    if hidden is None or hidden.dim() != 3:
        return None
    return DECODE if hidden.shape[1] == 1 else PREFILL


def _patch_common(tally: Sink, kind: Callable[[], str], on_decoded: Callable) -> None:
    """Codec, digests, signatures and stream writes: both sides have them."""

    def decoding(fn: Callable) -> Callable:
        timed = timed_sync(fn, tally, "codec decode", kind)

        def wrapper(*args: object, **kwargs: object) -> object:
            message = timed(*args, **kwargs)
            on_decoded(message)
            return message

        return wrapper

    _patch_function("trustswarm.protocol.codec", "decode_message", decoding)
    _patch_function(
        "trustswarm.protocol.codec",
        "encode_message",
        lambda fn: timed_sync(fn, tally, "codec encode", kind),
    )
    for name in ("tensors_digest", "bytes_digest"):
        _patch_function(
            "trustswarm.protocol.digests",
            name,
            lambda fn: timed_sync(fn, tally, "digests + chain links", kind),
        )
    _patch_function(
        "trustswarm.protocol.sessions",
        "next_link",
        lambda fn: timed_sync(fn, tally, "digests + chain links", kind),
    )
    _patch_function(
        "trustswarm.protocol.identity",
        "verify_peer_signature",
        lambda fn: timed_sync(fn, tally, "ed25519 verify", kind),
    )
    from trustswarm.protocol.identity import Identity

    _patch_method(Identity, "sign", lambda fn: timed_sync(fn, tally, "ed25519 sign", kind))
    _patch_function(
        "trustswarm.protocol.framing",
        "write_frame",
        lambda fn: timed_async(fn, tally, "stream writes", kind),
    )


# -- client ---------------------------------------------------------------------------


@dataclass
class ClientProfile:
    """The client process's timings, into `tally` (switch it per swarm); nothing is
    recorded while `enabled` is False. `step_began` is called by the embedding hook."""

    tally: Tally = field(default_factory=Tally)
    enabled: bool = False
    kind: str = OTHER
    _last: tuple[str, float] | None = None
    _embed_began: float = 0.0

    def add(self, kind: str, category: str, seconds: float) -> None:
        if self.enabled:
            self.tally.add(kind, category, seconds)

    def current(self) -> str:
        return self.kind

    def step_began(self, tokens: int) -> None:
        now = perf_counter()
        if self._last is not None:
            kind, began = self._last
            self.add(kind, "TOTAL wall", now - began)
        self.kind = DECODE if tokens == 1 else PREFILL
        self._last = (self.kind, now)
        self.add(self.kind, "steps", 0.0)
        self._embed_began = perf_counter()

    def run_ended(self) -> None:
        """The last step of a generate call has no next step to end its wall time."""
        self._last = None
        self.kind = OTHER

    def install(self) -> None:
        """Patch the client side (once per process, before any model is made)."""
        import_all()
        _patch_common(self, self.current, lambda message: None)
        _patch_function(
            "trustswarm.protocol.framing",
            "read_frame",
            lambda fn: timed_async(fn, self, "waiting for answers (reads)", self.current),
        )
        from trustswarm.client.loop import BackgroundLoop

        # The caller's thread waiting for the session's trio loop: the remote part of a step.
        _patch_method(
            BackgroundLoop,
            "run",
            lambda fn: timed_sync(fn, self, "remote step (loop.run)", self.current),
        )
        _report_missing("client")

    def hook(self, model: object) -> None:
        """Timers on one model's local parts: the embedding and norm + LM head."""
        profile = self

        def embed_pre(_module: object, inputs: tuple) -> None:
            profile.step_began(int(inputs[0].shape[-1]))

        def embed_post(_module: object, _inputs: object, _output: object) -> None:
            profile.add(profile.kind, "embedding", perf_counter() - profile._embed_began)

        model.embed_tokens.register_forward_pre_hook(embed_pre)
        model.embed_tokens.register_forward_hook(embed_post)
        model.logits_of = timed_sync(
            model.logits_of, self, "LM head (norm + lm_head)", self.current
        )


# -- servers --------------------------------------------------------------------------

_SERVER_KIND: contextvars.ContextVar[str] = contextvars.ContextVar("bench_kind", default=OTHER)


def _server_decoded(message: object) -> None:
    kind = kind_of_message(message)
    if kind is not None:
        _SERVER_KIND.set(kind)


def install_server(tally: Tally) -> None:
    """Patch a server process: common parts, the thread hop, runner and blocks."""
    import_all()
    kind = _SERVER_KIND.get
    _patch_common(tally, kind, _server_decoded)
    from trustswarm.models.runner import BlockRunner
    from trustswarm.node.handlers import ServingContext

    _patch_method(
        ServingContext, "run", lambda fn: timed_async(fn, tally, "thread hop + run", kind)
    )
    _patch_method(BlockRunner, "_run", lambda fn: timed_sync(fn, tally, "runner", kind))
    for name in ("step", "forward"):
        _patch_method(BlockRunner, name, lambda fn: timed_sync(fn, tally, "runner call", kind))
    _patch_function(
        "trustswarm.models.batched_step",
        "run_steps",
        lambda fn: timed_sync(fn, tally, "runner call", kind),
    )
    original_init = BlockRunner.__init__

    def init(self: BlockRunner, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)
        for index, block in enumerate(self.blocks, start=self.start):
            _hook_block(block, f"block {index}", tally, kind)

    BlockRunner.__init__ = init
    _report_missing("server")


def _hook_block(block: object, category: str, tally: Sink, kind: Callable[[], str]) -> None:
    began = threading.local()

    def pre(_module: object, _inputs: object) -> None:
        began.t = perf_counter()

    def post(_module: object, _inputs: object, _output: object) -> None:
        tally.add(kind(), category, perf_counter() - began.t)

    block.register_forward_pre_hook(pre)
    block.register_forward_hook(post)


def node_main(tally_path: str, argv: list[str]) -> int:
    """`trustswarm node start ...` with the server profile on; the tally is written
    to `tally_path` when the process exits."""
    tally = Tally()
    install_server(tally)

    def dump() -> None:
        Path(tally_path).write_text(json.dumps(tally.to_json()))

    atexit.register(dump)
    from trustswarm.cli import main

    try:
        return main(argv)
    finally:
        dump()


if __name__ == "__main__":  # python -m trustswarm.testing.step_profile TALLY.json node start ...
    sys.exit(node_main(sys.argv[1], sys.argv[2:]))
