"""Token-by-token decoding through one inference session per request, bridged to asyncio.

The client API is synchronous (its network runs on its own trio thread), so a request's
whole decode loop runs in one worker thread (`anyio.to_thread.run_sync`, bounded by a
capacity limiter: at most that many sessions at once). The loop hands each piece of text
to the event loop through an anyio memory channel; the request's side sets a cancel flag
when its client goes away, and the loop checks it before every step, closes its session
(on every server) and returns. Decoding uses the model's own `embed_tokens`,
`inference_session` and `logits_of` plus transformers' logits warpers, not `generate`.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import torch
from anyio.streams.memory import MemoryObjectSendStream
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from trustswarm.protocol.errors import TrustswarmError

from .errors import APIError, GenerationFailure
from .schemas import Sampling
from .text import StopText
from .trust import TrustRecorder

log = logging.getLogger("trustswarm.api")

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    trust: dict[str, Any]
    failure: GenerationFailure | None = None  # set when the swarm failed mid-way


Event = Delta | Done


def processors_for(sampling: Sampling) -> LogitsProcessorList:
    """transformers' warpers for OpenAI's temperature / top_p (none when greedy)."""
    processors = LogitsProcessorList()
    if sampling.temperature > 0:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return processors


def pick(
    scores: torch.Tensor, logits: torch.Tensor, sampling: Sampling, generator: torch.Generator
) -> int:
    """The next token: sampled from the warped scores, or greedy. A temperature so small
    that the warped scores overflow (NaN probabilities) is greedy too."""
    if sampling.temperature > 0:
        probs = torch.softmax(scores, dim=-1)
        if bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0:
            return int(torch.multinomial(probs, 1, generator=generator)[0, 0])
    return int(logits.argmax(dim=-1)[0])


def swarm_failure(exc: BaseException) -> GenerationFailure:
    return GenerationFailure(f"the swarm could not serve this request: {exc}")


@dataclass(eq=False)  # hashable by identity: the capacity limiter's borrower
class GenerationJob:
    """One request's generation: open (a session), run (decode), cancel (from any thread)."""

    model: Any  # DistributedModelForCausalLM
    tokenizer: Any
    prompt_ids: list[int]
    sampling: Sampling
    eos_ids: frozenset[int]
    redundancy: int | None = None  # None: the model's
    cancelled: threading.Event = field(default_factory=threading.Event)
    session: Any = None  # SyncInferenceSession once open
    trust: TrustRecorder | None = None
    completion_tokens: int = 0  # sampled so far (an end-of-sequence token included)

    def cancel(self) -> None:
        self.cancelled.set()

    def open(self) -> None:
        """Blocking: open the inference session (on every span's servers). Raises
        APIError (503) when the swarm cannot."""
        max_length = len(self.prompt_ids) + self.sampling.max_tokens
        try:
            self.session = self.model.inference_session(max_length, redundancy=self.redundancy)
        except (TrustswarmError, BaseExceptionGroup) as exc:
            raise swarm_failure(exc).to_api_error() from None
        self.trust = TrustRecorder(self.model, self.session.session)
        self.trust.observe()

    def close(self) -> None:
        """Close the session if it is open (idempotent, never raises)."""
        session, self.session = self.session, None
        if session is not None:
            try:
                session.close()
            except Exception as exc:
                log.warning("closing an inference session failed: %s", exc)

    def run(self, emit: Callable[[Event], bool]) -> None:
        """Blocking: decode until done, then close the session and emit Done. `emit`
        returns False when nobody listens any more (treated as a cancel)."""
        stop_text = StopText(self.tokenizer, self.sampling.stop)
        failure = None
        try:
            with torch.inference_mode():
                reason = self._decode(stop_text, emit)
        except (TrustswarmError, BaseExceptionGroup) as exc:  # a group: from trio
            reason, failure = STOP, swarm_failure(exc)
            log.warning("generation failed: %s", exc)
        except Exception as exc:  # a bug of ours: the client gets a 500-style error
            log.error("generation failed unexpectedly", exc_info=exc)
            reason = STOP
            failure = GenerationFailure("internal server error", 500, "server_error", None)
        finally:
            self.close()
        if failure is None and reason != CANCELLED and (rest := stop_text.flush()):
            emit(Delta(rest))
        emit(
            Done(
                finish_reason=reason,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=self.completion_tokens,
                trust=self.trust.facts() if self.trust is not None else {},
                failure=failure,
            )
        )

    def _generator(self) -> torch.Generator:
        seed = self.sampling.seed
        return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)

    def _decode(self, stop_text: StopText, emit: Callable[[Event], bool]) -> str:
        if self.session is None:
            raise APIError("the job's session is not open", status=500)
        model, sampling = self.model, self.sampling
        processors, generator = processors_for(sampling), self._generator()
        sequences = torch.tensor([self.prompt_ids], dtype=torch.long)
        mask = torch.ones_like(sequences)
        positions = torch.arange(sequences.shape[1])[None]
        step_input = model.embed_tokens(sequences)
        for _ in range(sampling.max_tokens):
            if self.cancelled.is_set():
                return CANCELLED
            hidden = self.session.step(step_input, positions, mask)
            self.trust.observe()
            logits = model.logits_of(hidden[:, -1])
            token = pick(processors(sequences, logits), logits, sampling, generator)
            self.completion_tokens += 1
            if token in self.eos_ids:
                return STOP
            text = stop_text.push(token)
            if text and not emit(Delta(text)):
                return CANCELLED
            if stop_text.stopped:
                return STOP
            next_ids = torch.tensor([[token]], dtype=torch.long)
            sequences = torch.cat([sequences, next_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            positions = positions[:, -1:] + 1
            step_input = model.embed_tokens(next_ids)
        return LENGTH


# -- the bridge to the event loop ---------------------------------------------------------


def event_channel() -> tuple[MemoryObjectSendStream[Event], Any]:
    """Unbounded: the worker never blocks on a slow reader (text is small; a reader
    that went away closes its end, which the worker sees as a cancel)."""
    return anyio.create_memory_object_stream[Event](math.inf)


async def open_job(job: GenerationJob, limiter: anyio.CapacityLimiter) -> None:
    """Take a session slot and open the job's session in a worker thread. The slot is
    held until `run_job` ends. Raises APIError."""
    await limiter.acquire_on_behalf_of(job)
    try:
        await anyio.to_thread.run_sync(job.open)
    except BaseException:
        limiter.release_on_behalf_of(job)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(job.close)
        raise


async def run_job(
    job: GenerationJob, send: MemoryObjectSendStream[Event], limiter: anyio.CapacityLimiter
) -> None:
    """Run an opened job in a worker thread, its events into `send` (closed at the end)."""

    def emit(event: Event) -> bool:
        try:
            anyio.from_thread.run_sync(send.send_nowait, event)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            job.cancel()
            return False
        return True

    try:
        async with send:
            with anyio.CancelScope(shield=True):  # the thread always finishes and closes
                await anyio.to_thread.run_sync(job.run, emit)
    finally:
        limiter.release_on_behalf_of(job)


async def watch_disconnect(receive: Callable[[], Any], job: GenerationJob) -> None:
    """Cancel `job` once the ASGI connection reports the client gone."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return
