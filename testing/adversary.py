"""Testing and demo only: a real block server that signs wrong answers.

It is a BlockServer subclass, started in code by tests, benchmarks and the demo's
cheating process (demo_cheater.py); no flag of the production `node start` can turn
it on. Its statements carry
valid signatures and the honest weights digest: exactly the threat redundancy and
verifiers exist for.

Output tampering (noise, scale, replay) acts on the answer just before it is signed,
on a `fraction` of answers, optionally only for peers it has (not) seen before.
Weight tampering (skip_block, wrong_weights, quantized) changes the loaded blocks, so
every answer of every kind is wrong; it ignores `fraction` and `peers`.

`dtype_liar_server_cls` announces float32 while computing in bfloat16: it answers in
bfloat16 (the dtype checks refuse it) or casts each answer to float32 first (only the
float32 tolerance can tell).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from trustswarm.models.runner import BlockRunner
from trustswarm.node.handlers import ServingContext
from trustswarm.node.server import BlockServer
from trustswarm.protocol.announcement import SignedAnnouncement, sign_announcement
from trustswarm.protocol.codec import Message

log = logging.getLogger("trustswarm.adversary")
OUTPUT_KINDS = ("noise", "scale", "replay")
WEIGHT_KINDS = ("skip_block", "wrong_weights", "quantized")


@dataclass(frozen=True)
class Tamper:
    kind: Literal["noise", "scale", "replay", "skip_block", "wrong_weights", "quantized"]
    amount: float = 0.05  # noise: std as a fraction of each token's RMS; scale: factor - 1
    fraction: float = 1.0  # share of answers tampered (output kinds)
    peers: Literal["all", "new", "seen"] = "all"  # new: first contact only; seen: known peers only
    bits: int = 4  # quantized: bits per weight, symmetric, groups of 32
    only: str | None = None  # output kinds: tamper only answers of this kind ("backward", ...)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS + WEIGHT_KINDS:
            raise ValueError(f"unknown tamper kind {self.kind!r}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError("fraction must be in [0, 1]")


@dataclass
class TamperingContext(ServingContext):
    tamper: Tamper = Tamper("noise")
    rng: random.Random = field(default_factory=random.Random)
    seen: set[str] = field(default_factory=set)
    previous: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    tampered: int = 0

    def _chosen(self, peer: str) -> bool:
        first_contact = peer not in self.seen
        self.seen.add(peer)
        if self.tamper.kind not in OUTPUT_KINDS:
            return False
        if self.tamper.peers == "new" and not first_contact:
            return False
        if self.tamper.peers == "seen" and first_contact:
            return False
        return self.rng.random() < self.tamper.fraction

    def _tampered(self, output: torch.Tensor) -> torch.Tensor:
        x = output.float()
        if self.tamper.kind == "noise":
            rms = x.pow(2).mean(-1, keepdim=True).sqrt()
            generator = torch.Generator().manual_seed(self.rng.getrandbits(31))
            x = x + self.tamper.amount * rms * torch.randn(x.shape, generator=generator)
        elif self.tamper.kind == "scale":
            x = x * (1.0 + self.tamper.amount)
        else:  # replay an earlier answer of the same shape, if any
            earlier = self.previous.get(tuple(x.shape))
            x = earlier.float() if earlier is not None else x.flip(1)
        return x.to(output.dtype)

    def signed_answer(  # type: ignore[override]
        self,
        kind: str,
        start: int,
        end: int,
        raw_request: bytes,
        output: torch.Tensor,
        name: str,
        peer: str,
        session_id: str = "",
        step: int = 0,
        chain: str = "",
    ) -> Message:
        honest = output
        if (self.tamper.only in (None, kind)) and self._chosen(peer):
            output = self._tampered(output)
            self.tampered += 1
            log.warning("tampered answer #%d (%s to %s)", self.tampered, kind, peer[-8:])
        self.previous[tuple(honest.shape)] = honest.detach().clone()
        return super().signed_answer(
            kind, start, end, raw_request, output, name, peer, session_id, step, chain
        )


def quantize_(weight: torch.Tensor, bits: int, group: int = 32) -> None:
    """Symmetric round-to-nearest quantisation in groups along the input dim, in place."""
    flat = weight.data.float().reshape(-1, group)
    levels = 2 ** (bits - 1) - 1
    scale = flat.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
    weight.data.copy_(((flat / scale).round().clamp(-levels, levels) * scale).reshape(weight.shape))


def tamper_weights(runner: BlockRunner, tamper: Tamper) -> None:
    blocks = runner.blocks
    if tamper.kind == "skip_block":
        # Zero the two projections that write into the residual: the block passes its
        # input through unchanged, as if it were skipped.
        last = blocks[-1]
        for module in (last.self_attn.o_proj, last.mlp.down_proj):
            module.weight.data.zero_()
    elif tamper.kind == "wrong_weights":
        total = runner.model_dir.num_blocks
        for i, block in enumerate(blocks):
            other = (runner.start + i + 1) % total
            donor = runner.model_dir.load_blocks(other, other + 1, dtype=runner.dtype)[0]
            block.load_state_dict(donor.state_dict())
    elif tamper.kind == "quantized":
        for block in blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear) and module.weight.shape[-1] % 32 == 0:
                    quantize_(module.weight, tamper.bits)


def derived_context(
    honest: ServingContext, cls: type[ServingContext], **extra: object
) -> ServingContext:
    """`cls` (a ServingContext subclass) with the honest context's fields and `extra`."""
    base = {f.name: getattr(honest, f.name) for f in dataclasses.fields(ServingContext)}
    return cls(**base, **extra)


def adversarial_server_cls(tamper: Tamper, boast: float = 1.0) -> type[BlockServer]:
    """A BlockServer subclass that tampers as `tamper` says (for LocalSwarm.start_server).
    `boast` multiplies the throughput it announces, to attract routes as a cheater would."""

    class AdversarialServer(BlockServer):
        def _load_runner(self, span: tuple[int, int]) -> BlockRunner:
            runner = super()._load_runner(span)
            if tamper.kind in WEIGHT_KINDS:
                tamper_weights(runner, tamper)
            return runner

        def _make_context(self) -> ServingContext:
            self.throughput *= boast
            return derived_context(
                super()._make_context(),
                TamperingContext,
                tamper=tamper,
                rng=random.Random(tamper.seed),
            )

        @property
        def tampered(self) -> int:
            return self.ctx.tampered if isinstance(self.ctx, TamperingContext) else 0

    AdversarialServer.__name__ = f"AdversarialServer[{tamper.kind}]"
    return AdversarialServer


@dataclass
class UpcastingContext(ServingContext):
    """Signs every answer as float32, whatever precision it was computed in."""

    def signed_answer(  # type: ignore[override]
        self,
        kind: str,
        start: int,
        end: int,
        raw_request: bytes,
        output: torch.Tensor,
        name: str,
        peer: str,
        session_id: str = "",
        step: int = 0,
        chain: str = "",
    ) -> Message:
        return super().signed_answer(
            kind, start, end, raw_request, output.float(), name, peer, session_id, step, chain
        )


def dtype_liar_server_cls(
    announced: str = "float32", upcast: bool = False, boast: float = 1.0
) -> type[BlockServer]:
    """A BlockServer that announces `announced` whatever dtype it computes in (start it
    with dtype=torch.bfloat16 to claim float32 precision). upcast=False: it answers in
    its compute dtype; upcast=True: it casts each answer to float32 before signing.
    `boast` multiplies the throughput it announces, to attract routes."""

    class DtypeLiar(BlockServer):
        def _announce_record(self) -> SignedAnnouncement:
            honest = super()._announce_record().announcement
            return sign_announcement(self.identity, dataclasses.replace(honest, dtype=announced))

        def _make_context(self) -> ServingContext:
            self.throughput *= boast
            ctx = super()._make_context()
            return derived_context(ctx, UpcastingContext) if upcast else ctx

    DtypeLiar.__name__ = f"DtypeLiar[{announced}{', upcast' if upcast else ''}]"
    return DtypeLiar
