"""Verifier settings: plain dataclasses, importable without torch or libp2p (the CLI
reads their defaults for --help)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CheckConfig:
    check_every: float = 1.0  # mean seconds between checks (exponential gaps)
    inference_share: float = 0.6  # share of checks that are inference sessions (generations)
    backward_share: float = 0.15  # share that are backward passes (fine-tuning traffic)
    # Inference checks are generations as a client's generate() runs them: max_length =
    # prompt + max_new_tokens, max_new_tokens log-uniform in [min, max]; the prefill and
    # max_new_tokens - 1 decode steps, or fewer (a stop token) in early_stop_share of them.
    min_new_tokens: int = 2
    max_new_tokens: int = 64
    early_stop_share: float = 0.25
    sub_span_share: float = 0.25  # share of checks that ask a part of the server's span
    timeout: float = 30.0  # per request, as a client's request_timeout
    max_concurrent: int = 2
    # Checker identities: this many clients at once, each living checker_lifetime seconds
    # on average (drawn in [0.5, 1.5] x that; the first ones staggered), then replaced.
    checkers: int = 3
    checker_lifetime: float = 600.0
    # Servers that keep refusing checks (busy, timeouts) get at most this share of the
    # picks and at most refusing_concurrent checks at a time, outside max_concurrent.
    max_refusing_share: float = 0.1
    refusing_concurrent: int = 1

    def __post_init__(self) -> None:
        if not self.check_every > 0:
            raise ValueError("check_every must be positive")
        if not 1 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("need 1 <= min_new_tokens <= max_new_tokens")
        shares = (
            self.inference_share,
            self.backward_share,
            self.sub_span_share,
            self.early_stop_share,
        )
        if not all(0 <= s <= 1 for s in shares):
            raise ValueError("shares must lie in [0, 1]")
        if self.inference_share + self.backward_share > 1:
            raise ValueError("inference_share + backward_share must not exceed 1")
        if not 0 < self.max_refusing_share <= 1:
            raise ValueError("max_refusing_share must lie in (0, 1]")
        if self.checkers < 1 or self.max_concurrent < 1 or self.refusing_concurrent < 1:
            raise ValueError("checkers, max_concurrent and refusing_concurrent must be >= 1")
        if not self.checker_lifetime > 0:
            raise ValueError("checker_lifetime must be positive")


@dataclass(frozen=True)
class ReportConfig:
    max_reports: int = 10  # per reporter within `window` seconds
    window: float = 60.0
    max_bytes: int = 64 * 1024 * 1024
    max_answers: int = 16
    max_exchanges: int = 1024  # summed over the report's answers
    timeout: float = 60.0  # to receive the report


@dataclass(frozen=True)
class AuditConfig:
    """Client audits (verifier/audits.py): quotas, queue, and their compute budget."""

    max_per_window: int = 60  # audits accepted per client peer id within `window` (0: none)
    window: float = 60.0
    compute_share: float = 0.5  # at most this share of wall time is spent judging audits
    queue_items: int = 256  # audits waiting, over all clients
    queue_bytes: int = 256 * 1024 * 1024
    max_bytes: int = 32 * 1024 * 1024  # one audit
    max_exchanges: int = 1024  # one audit (an inference transcript: its steps)
    timeout: float = 60.0  # to receive one audit

    def __post_init__(self) -> None:
        if self.max_per_window < 0 or not self.window > 0:
            raise ValueError("need max_per_window >= 0 and window > 0")
        if not 0 < self.compute_share <= 1:
            raise ValueError("compute_share must lie in (0, 1]")
        if self.queue_items < 1 or self.max_bytes < 1 or self.max_exchanges < 1:
            raise ValueError("queue_items, max_bytes and max_exchanges must be positive")
        if self.queue_bytes < self.max_bytes:
            raise ValueError("queue_bytes must hold at least one audit of max_bytes")


@dataclass(frozen=True)
class VerifierConfig:
    checks: CheckConfig = field(default_factory=CheckConfig)
    reports: ReportConfig = field(default_factory=ReportConfig)
    audits: AuditConfig = field(default_factory=AuditConfig)
    # Seconds between swarm discovery rounds, over all checker clients together (each
    # refreshes every refresh_every x checks.checkers, a client's 30 s by default).
    refresh_every: float = 10.0
    republish_every: float = 30.0  # seconds between re-publishing rounds
    republish_horizon: float = 86_400.0  # re-publish servers checked within this long
    ban_horizon: float = 7 * 86_400.0  # ... and bans made within this long
    record_ttl: float = 300.0  # seconds a signed record stays valid
    publish_pace: float = 0.15  # seconds between two publishes (gossipsub drops bursts)
    connect_timeout: float = 10.0
