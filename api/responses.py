"""OpenAI's response shapes: `chat.completion`, `text_completion` and their stream chunks
(server-sent events, `data: {...}` lines, `data: [DONE]` at the end). Each response and
the last chunk carry the request's trust facts as the `trustswarm` extension field."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .generation import CANCELLED, Delta, Done, Event

EXTENSION = "trustswarm"


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


DONE_EVENT = sse("[DONE]")


def usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def finish_reason(done: Done) -> str:
    # A cancelled request has no reader; "stop" keeps any logged body well-formed.
    return "stop" if done.finish_reason == CANCELLED else done.finish_reason


@dataclass
class Shape:
    """One response's identity and shape: chat or text completion."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    # -- whole responses ------------------------------------------------------------

    def response(self, text: str, done: Done) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text}
            obj = "text_completion"
        choice |= {"finish_reason": finish_reason(done), "logprobs": None}
        body = self._envelope(obj, [choice])
        body["usage"] = usage(done)
        body[EXTENSION] = done.trust
        return body

    # -- stream chunks --------------------------------------------------------------

    def _chunk(self, content: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content is not None:
                delta["content"] = content
            choice = {"index": 0, "delta": delta}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": content or ""}
            obj = "text_completion"
        choice |= {"finish_reason": reason, "logprobs": None}
        return self._envelope(obj, [choice])

    def first_chunk(self) -> bytes:
        return sse(self._chunk("", None, role=True)) if self.chat else b""

    def chunks(self, event: Event, include_usage: bool) -> bytes:
        """The SSE bytes for one event of the generation."""
        if isinstance(event, Delta):
            return sse(self._chunk(event.text, None))
        if event.failure is not None:
            return sse(event.failure.to_api_error().to_json()) + DONE_EVENT
        last = self._chunk(None, finish_reason(event))
        last[EXTENSION] = event.trust
        out = sse(last)
        if include_usage:
            tail = self._envelope(last["object"], [])
            tail["usage"] = usage(event)
            out += sse(tail)
        return out + DONE_EVENT
