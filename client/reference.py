"""The client's own copy of blocks: the tie-breaker when replicas disagree.

Optional (`from_pretrained(..., local_reference=True)`): a client that holds the
blocks' weights in its model directory recomputes a disputed span itself instead
of failing. Runners are loaded on first use (with digest checks) and kept.
"""

from __future__ import annotations

import torch
import trio

from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ModelDir


class LocalReference:
    def __init__(self, model_dir: ModelDir, dtype: torch.dtype = torch.float32) -> None:
        self.model_dir = model_dir
        self.dtype = dtype
        self._runners: dict[tuple[int, int], BlockRunner] = {}

    def has(self, start: int, end: int) -> bool:
        files = self.model_dir.manifest.block_files[start:end]
        return bool(files) and all((self.model_dir.path / f).is_file() for f in files)

    def _runner(self, start: int, end: int) -> BlockRunner:
        runner = self._runners.get((start, end))
        if runner is None:
            runner = BlockRunner(self.model_dir, start, end, self.dtype)
            self._runners[(start, end)] = runner
        return runner

    async def forward(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        def run() -> torch.Tensor:
            return self._runner(start, end).forward(hidden, positions, mask).float()

        return await trio.to_thread.run_sync(run)

    async def backward(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        def run() -> torch.Tensor:
            return self._runner(start, end).backward(hidden, grad, positions, mask).float()

        return await trio.to_thread.run_sync(run)
