"""Errors of the health page."""

from trustswarm.protocol.errors import TrustswarmError


class HealthError(TrustswarmError):
    """Bad options for `trustswarm health` (peers, verifiers, listen address, refresh)."""
