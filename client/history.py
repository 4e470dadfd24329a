"""Histories that grow by one step at a time: [rows, tokens, ...] tensors appended to
along the token dimension, in a buffer that doubles when full.

A client keeps every row's inputs so far (to replay them to a replacement server, or to
a fresh session after a beam reorder). Concatenating the history with each step copies
all of it every step (O(n) per step, O(n^2) per generation); here a decode step writes
its own token only, and the history is a view of the buffer's first `length` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class GrowingHistory:
    """`value` is everything appended so far (None before the first append)."""

    value: torch.Tensor | None = None
    _buffer: torch.Tensor | None = None

    def append(self, part: torch.Tensor, capacity_hint: int = 0) -> torch.Tensor:
        """Append `part` ([rows, new, ...]) after `value`; returns the new value. The
        caller's tensors are never written to (the first part is kept as it is)."""
        if self.value is None:
            self.value = part
            return part
        seen, new = self.value.shape[1], part.shape[1]
        if part.shape[0] != self.value.shape[0] or part.shape[2:] != self.value.shape[2:]:
            raise ValueError(f"cannot append {list(part.shape)} to {list(self.value.shape)}")
        dtype = torch.promote_types(self.value.dtype, part.dtype)  # as torch.cat would
        buffer = self._buffer
        if (
            buffer is None
            or buffer.data_ptr() != self.value.data_ptr()  # value was replaced meanwhile
            or buffer.shape[1] < seen + new
            or buffer.dtype != dtype
        ):
            capacity = max(2 * (seen + new), capacity_hint)
            shape = (self.value.shape[0], capacity, *self.value.shape[2:])
            buffer = torch.empty(shape, dtype=dtype, device=part.device)
            buffer[:, :seen] = self.value
            self._buffer = buffer
        buffer[:, seen : seen + new] = part
        self.value = buffer[:, : seen + new]
        return self.value

    def replace(self, value: torch.Tensor | None) -> None:
        """A new history (e.g. rows reordered); the buffer is rebuilt at the next append."""
        self.value, self._buffer = value, None

    def append_to(
        self, current: torch.Tensor | None, part: torch.Tensor, capacity_hint: int = 0
    ) -> torch.Tensor:
        """`current` (the owner's attribute, which it may have replaced since) with `part`
        appended."""
        if current is not self.value:
            self.replace(current)
        return self.append(part, capacity_hint)
