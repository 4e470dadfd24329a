"""Verifier settings: plain dataclasses, importable without torch or libp2p (the CLI
reads their defaults for --help)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CheckConfig:
    check_every: float = 1.0  # mean seconds between checks (exponential gaps)
    inference_share: float = 0.6  # share of checks that are multi-step inference sessions
    backward_share: float = 0.15  # share that are backward passes (fine-tuning traffic)
    min_decode_steps: int = 2  # 1-token steps after the prefill, drawn uniformly
    max_decode_steps: int = 6
    sub_span_share: float = 0.25  # share of checks that ask a part of the server's span
    timeout: float = 30.0  # per request, as a client's request_timeout
    max_concurrent: int = 2

    def __post_init__(self) -> None:
        if not self.check_every > 0:
            raise ValueError("check_every must be positive")
        if not 0 <= self.min_decode_steps <= self.max_decode_steps:
            raise ValueError("need 0 <= min_decode_steps <= max_decode_steps")
        shares = (self.inference_share, self.backward_share, self.sub_span_share)
        if not all(0 <= s <= 1 for s in shares):
            raise ValueError("shares must lie in [0, 1]")
        if self.inference_share + self.backward_share > 1:
            raise ValueError("inference_share + backward_share must not exceed 1")


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
    refresh_every: float = 10.0  # seconds between swarm discovery rounds
    republish_every: float = 30.0  # seconds between re-publishing every record
    record_ttl: float = 300.0  # seconds a signed record stays valid
    publish_pace: float = 0.15  # seconds between two publishes (gossipsub drops bursts)
    connect_timeout: float = 10.0
