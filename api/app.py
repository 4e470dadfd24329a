"""The OpenAI-compatible Starlette app: `/v1/models`, `/v1/chat/completions`,
`/v1/completions`, each request its own inference session through the swarm.

Every error is OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`): 400
for a request we refuse, 404 for an unknown model or path, 413 for a body over the
limit, 503 when the swarm cannot serve, 500 (logged) for a bug of ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .errors import NOT_FOUND, SERVER_ERROR, APIError, error_body, invalid
from .generation import (
    Delta,
    Done,
    GenerationJob,
    event_channel,
    open_job,
    run_job,
    watch_disconnect,
)
from .responses import Shape
from .schemas import GenerationRequest, Limits, parse_body, parse_chat, parse_completion

log = logging.getLogger("trustswarm.api")
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON


@dataclass
class Served:
    """What the app serves: one distributed model, its tokenizer and the limits."""

    model: Any  # DistributedModelForCausalLM
    tokenizer: Any
    limits: Limits
    max_concurrent: int = 8  # inference sessions at once; more requests wait for a slot
    max_body: int = DEFAULT_MAX_BODY
    redundancy: int | None = None  # per-session override; None: the model's
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.model_id = str(self.model.swarm.view.model_id)
        self.names = {self.model_id, self.model_id.partition("@")[0]}
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        eos = self.model.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos_ids)
        self.limiter = anyio.CapacityLimiter(self.max_concurrent)

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(
                f"the model {name[:100]!r} does not exist here; this server serves "
                f"{self.model_id!r}",
                status=404,
                type=NOT_FOUND,
                param="model",
                code="model_not_found",
            )

    def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids (chat: through the tokenizer's chat template)."""
        if request.messages is not None:
            ids = self._chat_ids(list(request.messages))
        elif isinstance(request.prompt, str):
            ids = list(self.tokenizer(request.prompt)["input_ids"])
        else:
            ids = list(request.prompt or ())
        if not ids:
            raise invalid("the prompt has no tokens", "prompt")
        needed = len(ids) + request.sampling.max_tokens
        if needed > self.context:
            raise invalid(
                f"this model's context is {self.context} tokens; the prompt has {len(ids)} "
                f"and max_tokens asks {request.sampling.max_tokens} more",
                "messages" if request.chat else "prompt",
                "context_length_exceeded",
            )
        return ids

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid("this model has no chat template: use /v1/completions", "messages")
        try:
            out = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as exc:  # the template's own raise_exception, or bad roles
            raise invalid(f"the chat template refused these messages: {exc}", "messages") from None
        return [int(t) for t in out["input_ids"]]

    def job(self, request: GenerationRequest, ids: list[int]) -> GenerationJob:
        return GenerationJob(
            self.model, self.tokenizer, ids, request.sampling, self.eos_ids, self.redundancy
        )


class GenerationStream(StreamingResponse):
    """The SSE response of one streamed generation. Whatever ends it (the last chunk,
    the client going away, an error), the job is cancelled and its session closed
    before the response returns."""

    def __init__(
        self, job: GenerationJob, shape: Shape, include_usage: bool, served: Served
    ) -> None:
        self.job = job
        self.served = served
        self._send, self._events = event_channel()
        super().__init__(
            self._body(shape, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _body(self, shape: Shape, include_usage: bool) -> AsyncIterator[bytes]:
        if first := shape.first_chunk():
            yield first
        async with self._events:
            async for event in self._events:
                yield shape.chunks(event, include_usage)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_job, self.job, self._send, self.served.limiter)
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel()  # no-op once done; else the worker stops at its next step
                self._events.close()


async def complete(job: GenerationJob, shape: Shape, receive: Receive, served: Served) -> dict:
    """Run a non-streamed generation to the end (or until the client goes away)."""
    send, events = event_channel()
    parts: list[str] = []
    done: Done | None = None
    watcher = anyio.CancelScope()

    async def watch() -> None:
        with watcher:
            await watch_disconnect(receive, job)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_job, job, send, served.limiter)
        tg.start_soon(watch)
        try:
            async with events:
                async for event in events:
                    if isinstance(event, Delta):
                        parts.append(event.text)
                    else:
                        done = event
        finally:
            job.cancel()
            watcher.cancel()
    if done is None:
        raise APIError("the generation ended without an answer", status=500, type=SERVER_ERROR)
    if done.failure is not None:
        raise done.failure.to_api_error()
    return shape.response("".join(parts), done)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(
            f"the request body exceeds {limit} bytes", status=413, code="request_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                f"the request body exceeds {limit} bytes", status=413, code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def api_app(served: Served) -> Starlette:
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(served)]})

    async def model(request: Request) -> Response:
        served.check_model(request.path_params["name"])
        return JSONResponse(_model_card(served))

    async def chat(request: Request) -> Response:
        return await _generate(request, served, parse_chat)

    async def completions(request: Request) -> Response:
        return await _generate(request, served, parse_completion)

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/models/{name:path}", model),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )


async def _generate(
    request: Request, served: Served, parse: Callable[[dict, Limits], GenerationRequest]
) -> Response:
    req = parse(parse_body(await read_body(request, served.max_body)), served.limits)
    served.check_model(req.model)
    ids = await anyio.to_thread.run_sync(served.encode, req)
    job = served.job(req, ids)
    await open_job(job, served.limiter)  # 503 here, before any header, if the swarm can't
    shape = Shape(req.chat, req.model)
    if req.stream:
        return GenerationStream(job, shape, req.include_usage, served)
    return JSONResponse(await complete(job, shape, request.receive, served))


def _model_card(served: Served) -> dict[str, Any]:
    return {
        "id": served.model_id,
        "object": "model",
        "created": served.created,
        "owned_by": "trustswarm",
    }


async def _api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, APIError):
        return await _server_error(request, exc)
    return JSONResponse(exc.to_json(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    kind = NOT_FOUND if status == 404 else "invalid_request_error"
    message = f"{getattr(exc, 'detail', '')}: {request.method} {request.url.path}"
    return JSONResponse(
        error_body(message[:300], kind), status_code=status, headers=getattr(exc, "headers", None)
    )


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s", request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", SERVER_ERROR), status_code=500)
