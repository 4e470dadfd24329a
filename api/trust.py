"""The trust facts of one request: which servers computed which blocks, with what
redundancy, which disagreements its replicas had, how many of its transcripts were
drawn for an audit. Carried in every response as the `trustswarm` extension field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrustRecorder:
    model: Any  # DistributedModelForCausalLM
    session: Any  # its InferenceSession (or RedundantInferenceSession)
    # (start, end) -> every peer id that served these blocks for this request, in order.
    spans: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    def observe(self) -> None:
        """Note the session's current servers (after open and after each step: a failed
        server's replacement is added, the failed one stays listed)."""
        for start, end, peers in self.session.servers():
            seen = self.spans.setdefault((start, end), [])
            seen.extend(p for p in peers if p not in seen)

    def facts(self) -> dict[str, Any]:
        """JSON-ready; call after the session closed (audits are drawn at close)."""
        auditor = self.model.swarm.auditor
        return {
            "model_id": self.model.swarm.view.model_id,
            "redundancy": getattr(self.session, "redundancy", 1),
            "spans": [
                {"start": start, "end": end, "servers": peers}
                for (start, end), peers in sorted(self.spans.items())
            ],
            "disagreements": [
                {
                    "kind": report.kind,
                    "start": report.start,
                    "end": report.end,
                    "resolution": report.resolution,
                    "accused": list(report.minority),
                }
                for report in self.session.disagreements
            ],
            "audits": {
                "drawn": self.session.audits,  # this request's transcripts sent to verifiers
                "rate": auditor.rate if auditor is not None else 0.0,
                "verifiers": [box.verifier for box in auditor.outboxes] if auditor else [],
                "client_totals": asdict(auditor.stats) if auditor is not None else None,
            },
        }
