"""Request validation: the JSON bodies of `/v1/chat/completions` and `/v1/completions`
into typed requests, or an `APIError` (400, OpenAI's `invalid_request_error`) naming the
offending parameter. Nothing a client sends may get past here as a 500.

Fields we do not know are ignored (clients send `user`, `metadata`, ...); fields we know
but do not implement are accepted only at their no-op value, otherwise refused clearly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import APIError, invalid

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    max_tokens_default: int = 256
    max_tokens_limit: int = 4096
    max_stop: int = 4  # OpenAI's limit
    max_stop_chars: int = 256
    max_messages: int = 1024
    vocab_size: int | None = None  # token-id prompts are checked against it when known


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: chat `messages` or a completion `prompt` (text or ids)."""

    model: str
    sampling: Sampling
    stream: bool
    include_usage: bool
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | tuple[int, ...] | None = None

    @property
    def chat(self) -> bool:
        return self.messages is not None


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object. Raises APIError."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, ints beyond the digit limit
        raise invalid("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return body


def parse_chat(body: dict[str, Any], limits: Limits) -> GenerationRequest:
    _refuse_unsupported(body, CHAT_NOOPS)
    return _request(body, limits, messages=_messages(body.get("messages"), limits))


def parse_completion(body: dict[str, Any], limits: Limits) -> GenerationRequest:
    _refuse_unsupported(body, COMPLETION_NOOPS)
    return _request(body, limits, prompt=_prompt(body.get("prompt"), limits))


def _request(body: dict[str, Any], limits: Limits, **source: Any) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a non-empty string", "model")
    _text(model, "model")
    n = _integer(body, "n", 1, 1, 128)
    if n != 1:
        raise invalid(f"only n=1 is supported, got n={n}", "n", "unsupported_value")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise invalid(
            "'stream_options' must be an object, and only with stream=true", "stream_options"
        )
    include_usage = _boolean(options or {}, "include_usage", False, "stream_options.include_usage")
    return GenerationRequest(
        model=model,
        sampling=_sampling(body, limits),
        stream=stream,
        include_usage=include_usage,
        **source,
    )


def _sampling(body: dict[str, Any], limits: Limits) -> Sampling:
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    seed = _integer(body, "seed", None, -MAX_SEED - 1, MAX_SEED)
    return Sampling(
        max_tokens=_integer(body, name, limits.max_tokens_default, 1, limits.max_tokens_limit),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=seed,
        stop=_stop(body.get("stop"), limits),
    )


# -- fields ---------------------------------------------------------------------------


def _text(value: str, param: str) -> str:
    """A string that is valid Unicode (JSON lets lone surrogates through)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"'{param}' is not valid Unicode text", param) from None
    return value


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{name}' must be a number", name)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise invalid(f"'{name}' must lie in [{lo:g}, {hi:g}], got {_show(value)}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer", name)
    if not lo <= value <= hi:
        raise invalid(f"'{name}' must lie in [{lo}, {hi}], got {_show(value)}", name)
    return value


def _boolean(body: dict[str, Any], name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{param or name}' must be true or false", param or name)
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _stop(value: object, limits: Limits) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    if len(items) > limits.max_stop:
        raise invalid(f"'stop' takes at most {limits.max_stop} sequences", "stop")
    for item in items:
        if not item or len(item) > limits.max_stop_chars:
            raise invalid(
                f"each stop sequence must be 1 to {limits.max_stop_chars} characters", "stop"
            )
        _text(item, "stop")
    return tuple(dict.fromkeys(items))


def _messages(value: object, limits: Limits) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list", "messages")
    if len(value) > limits.max_messages:
        raise invalid(f"'messages' holds at most {limits.max_messages} messages", "messages")
    return tuple(_message(m, i) for i, m in enumerate(value))


def _message(message: object, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"'{param}' must be an object", param)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid(
            f"'{param}.role' must be one of {sorted(ROLES)} (tool calls are not supported)",
            f"{param}.role",
        )
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        content = "\n".join(
            _text_part(part, f"{param}.content[{i}]") for i, part in enumerate(content)
        )
    if not isinstance(content, str):
        raise invalid(
            f"'{param}.content' must be a string or a list of text parts", f"{param}.content"
        )
    return {"role": ROLES[role], "content": _text(content, f"{param}.content")}


def _text_part(part: object, param: str) -> str:
    if (
        not isinstance(part, dict)
        or part.get("type") != "text"
        or not isinstance(part.get("text"), str)
    ):
        raise invalid(
            f"'{param}' must be a text part ({{'type': 'text', 'text': ...}}); "
            "images and audio are not supported",
            param,
        )
    return part["text"]


def _prompt(value: object, limits: Limits) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        if not value:
            raise invalid("'prompt' must not be empty", "prompt")
        return _text(value, "prompt")
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        top = limits.vocab_size
        if any(t < 0 or (top is not None and t >= top) for t in value):
            raise invalid(f"'prompt' token ids must lie in [0, {top})", "prompt")
        return tuple(value)
    if isinstance(value, list) and len(value) > 1:
        raise invalid("only one prompt per request is supported", "prompt", "unsupported_value")
    raise invalid("'prompt' must be a non-empty string or list of token ids", "prompt")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- known parameters we only accept at their no-op values ------------------------------

Check = Callable[[object], bool]


def _absent_or(*allowed: object) -> Check:
    return lambda v: v is None or any(v == a and type(v) is type(a) for a in allowed)


COMMON_NOOPS: dict[str, Check] = {
    "frequency_penalty": _absent_or(0, 0.0),
    "presence_penalty": _absent_or(0, 0.0),
    "logit_bias": _absent_or({}),
    "logprobs": _absent_or(False),
}
CHAT_NOOPS: dict[str, Check] = {
    **COMMON_NOOPS,
    "top_logprobs": _absent_or(0),
    "tools": _absent_or([]),
    "functions": _absent_or([]),
    "tool_choice": _absent_or("none"),
    "function_call": _absent_or("none"),
    "response_format": _absent_or({"type": "text"}),
    "audio": _absent_or(),
    "modalities": _absent_or(["text"]),
}
COMPLETION_NOOPS: dict[str, Check] = {
    **COMMON_NOOPS,
    "logprobs": _absent_or(0),
    "echo": _absent_or(False),
    "best_of": _absent_or(1),
    "suffix": _absent_or(""),
}


def _refuse_unsupported(body: dict[str, Any], noops: dict[str, Check]) -> None:
    for name, is_noop in noops.items():
        if name in body and not is_noop(body[name]):
            raise APIError(
                f"'{name}' is not supported by this server (leave it out)",
                param=name,
                code="unsupported_parameter",
            )
