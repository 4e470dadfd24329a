"""Errors the API answers with, in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}` with a matching HTTP status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trustswarm.protocol.errors import TrustswarmError

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"


class APIError(TrustswarmError):
    """A request the API refuses or could not serve; carries the OpenAI error fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = INVALID_REQUEST,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def to_json(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,  # noqa: A002
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error about `param`."""
    return APIError(message, status=400, param=param, code=code)


@dataclass(frozen=True)
class GenerationFailure:
    """Why a generation stopped early, as the stream's error event / the 5xx body."""

    message: str
    status: int = 503
    type: str = UNAVAILABLE
    code: str | None = "swarm_unavailable"

    def to_api_error(self) -> APIError:
        return APIError(self.message, status=self.status, type=self.type, code=self.code)
