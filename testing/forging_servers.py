"""Testing only: block servers that break the signing rules (not the arithmetic).

* ``forged_signature``: returns a wrong answer (5 % noise) under a statement naming
  itself but signed by another key, so nobody can hold it to the answer;
* ``other_request``: returns a wrong answer under a valid signature whose statement
  is for another request (the one it received before), so the signature proves
  nothing about this exchange.

Both must be refused by the client's statement checks (client/rpc.py) before the
answer is used. Like tests/adversary.py, these are BlockServer subclasses started in
code; no flag of `trustswarm node start` reaches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trustswarm.node.handlers import ServingContext
from trustswarm.node.server import BlockServer
from trustswarm.protocol.codec import Message
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.statement import SignedStatement
from trustswarm.testing.adversary import derived_context

MODES = ("forged_signature", "other_request")


@dataclass
class ForgingContext(ServingContext):
    mode: str = "forged_signature"
    impostor: Identity = field(default_factory=Identity.generate)
    last_request: bytes = b""
    answers: int = 0

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
        self.answers += 1
        x = output.float()
        gen = torch.Generator().manual_seed(self.answers)
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        wrong = (x + 0.05 * rms * torch.randn(x.shape, generator=gen)).to(output.dtype)
        if self.mode == "other_request":
            other = self.last_request or raw_request + b"\0"
            self.last_request = raw_request
            return super().signed_answer(
                kind, start, end, other, wrong, name, peer, session_id, step, chain
            )
        message = super().signed_answer(
            kind, start, end, raw_request, wrong, name, peer, session_id, step, chain
        )
        signed = SignedStatement.from_meta(message.meta)
        forged = SignedStatement(
            signed.statement, self.impostor.sign(signed.statement.canonical_bytes())
        )
        return Message(tensors=message.tensors, meta=forged.to_meta())


def forging_server_cls(mode: str, boast: float = 100.0) -> type[BlockServer]:
    if mode not in MODES:
        raise ValueError(f"unknown forging mode {mode!r}")

    class ForgingServer(BlockServer):
        def _make_context(self) -> ServingContext:
            self.throughput *= boast
            return derived_context(super()._make_context(), ForgingContext, mode=mode)

    ForgingServer.__name__ = f"ForgingServer[{mode}]"
    return ForgingServer
