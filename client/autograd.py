"""Autograd through remote blocks: forward on servers, backward on servers."""

from __future__ import annotations

from typing import Any

import torch


class RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        passes: Any,
        model: Any,
        positions: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        output, hops = model.run_async(
            passes.forward, hidden.detach(), positions, mask, 0, model.num_blocks
        )
        ctx.hops, ctx.passes, ctx.model = hops, passes, model
        ctx.save_for_backward(positions, mask)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        positions, mask = ctx.saved_tensors
        grad = ctx.model.run_async(ctx.passes.backward, ctx.hops, grad_output, positions, mask)
        return grad, None, None, None, None
