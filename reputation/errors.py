"""Errors of the reputation package."""

from __future__ import annotations

from trustswarm.protocol.errors import TrustswarmError


class ReputationError(TrustswarmError):
    """A reputation parameter, store or record operation is unusable."""
