"""Who may open an inference session: fair shares of a server's sessions and memory.

A session holds a KV cache for up to `max_length` tokens for as long as its client keeps
it (the idle timeout), so sessions are the resource one client can squat: without a cap
per peer one identity held all 32 sessions of a server for 300 s, and without a memory
budget the limits allowed ~2 M cached tokens (~90 GB for SmolLM2 in float32). A request
beyond either limit gets `busy` with a retry hint; the client goes to another server.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


def kv_bytes_per_token(config: object, blocks: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cached token costs over `blocks` blocks."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8 * blocks


@dataclass
class SessionAdmission:
    """The sessions a server holds now, per peer and in reserved KV-cache bytes."""

    max_sessions: int
    max_per_peer: int
    kv_budget_bytes: int
    by_peer: Counter[str] = field(default_factory=Counter)
    reserved_bytes: int = 0

    @property
    def active(self) -> int:
        return sum(self.by_peer.values())

    def refusal(self, peer: str, kv_bytes: int) -> str | None:
        """Why a new session of `kv_bytes` from `peer` must wait, or None to admit it."""
        if self.active >= self.max_sessions:
            return f"too many inference sessions: all {self.max_sessions} are in use; retry soon"
        if self.by_peer[peer] >= self.max_per_peer:
            return (
                f"this peer already holds {self.by_peer[peer]} sessions (at most "
                f"{self.max_per_peer} per peer); close one or retry later"
            )
        if self.reserved_bytes + kv_bytes > self.kv_budget_bytes:
            free = max(0, self.kv_budget_bytes - self.reserved_bytes)
            return (
                f"KV-cache memory budget: the session needs {kv_bytes} bytes, {free} are free; "
                "ask for a shorter max_length or retry later"
            )
        return None

    def admit(self, peer: str, kv_bytes: int) -> None:
        self.by_peer[peer] += 1
        self.reserved_bytes += kv_bytes

    def release(self, peer: str, kv_bytes: int) -> None:
        self.by_peer[peer] -= 1
        if self.by_peer[peer] <= 0:
            del self.by_peer[peer]
        self.reserved_bytes = max(0, self.reserved_bytes - kv_bytes)
