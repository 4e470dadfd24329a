"""Block server settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from trustswarm.protocol.limits import DEFAULT_LIMITS, Limits


@dataclass(frozen=True)
class ServerConfig:
    max_sessions: int = 32  # concurrent inference sessions
    max_sessions_per_peer: int = 8  # one identity cannot squat the rest
    kv_cache_bytes: int = 2 * 1024**3  # KV caches reserved over all sessions (max_length each)
    write_timeout: float = 30.0  # seconds to write one answer to a peer (slow readers)
    max_session_tokens: int = 2048  # max_length a session may ask for
    max_batch: int = 32
    max_tokens_per_request: int = 8192  # batch * new tokens in one forward / step
    session_idle_timeout: float = 300.0  # seconds without a step before a session is dropped
    request_timeout: float = 60.0  # seconds to receive one whole request frame
    stream_idle_timeout: float = 30.0  # a forward/backward stream waits this long for more
    announce_ttl: float = 120.0
    announce_every: float = 30.0
    # Concurrent inference steps of different sessions run as one batched forward
    # (node/step_batcher.py; float32 servers only).
    batch_steps: bool = True
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)

    def __post_init__(self) -> None:
        # max_sessions may be 0: a server that serves forward and backward passes only.
        for name, low in (("max_sessions", 0), ("max_sessions_per_peer", 1), ("kv_cache_bytes", 1)):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                raise ValueError(f"ServerConfig.{name} must be an integer >= {low}, got {value!r}")
        if type(self.batch_steps) is not bool:
            raise ValueError(f"ServerConfig.batch_steps must be a bool, got {self.batch_steps!r}")
        if not self.write_timeout > 0:
            raise ValueError("ServerConfig.write_timeout must be positive")
