"""Errors raised by trustswarm. Every failure a peer can cause has its own type."""

from __future__ import annotations


class TrustswarmError(Exception):
    """Base class of every error trustswarm raises on purpose."""


class ProtocolError(TrustswarmError):
    """A frame or message is malformed."""


class LimitExceededError(ProtocolError):
    """A frame or message is well-formed but over a configured limit."""


class SignatureError(TrustswarmError):
    """A signature or signed statement does not verify, or does not match the request."""


class IdentityError(TrustswarmError):
    """A key file or peer id is unusable."""


class SwarmError(TrustswarmError):
    """The swarm cannot serve a request (no route, every server failed, ...)."""


def trustswarm_error_in(exc: BaseException) -> TrustswarmError | None:
    """The first TrustswarmError in `exc`, looking inside the exception groups that
    trio's nurseries wrap errors in; None if there is none."""
    if isinstance(exc, TrustswarmError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = trustswarm_error_in(inner)
            if found is not None:
                return found
    return None


# Error codes carried in error frames; a peer never learns more than code + message.
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
BUSY = "busy"
NOT_SERVED = "not_served"
INTERNAL = "internal"
ERROR_CODES = frozenset({BAD_REQUEST, TOO_LARGE, BUSY, NOT_SERVED, INTERNAL})


class RemoteError(TrustswarmError):
    """A server answered with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def retriable_elsewhere(self) -> bool:
        """Whether another server may well accept the same request."""
        return self.code in (BUSY, TOO_LARGE, NOT_SERVED, INTERNAL)
