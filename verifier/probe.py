"""Sending a challenge to one server with the client library's own code, keeping the evidence.

There is no wire code here: a check is a client call made by one of the verifier's
checker clients (checkers.py). Forward and backward requests go through `call_span` with
the checker's stream pool (an idle stream to the server is reused, as a client's is);
inference is an `InferenceSession` pinned to the server (no failover: the check is about
this server) running a generation whose length is drawn like a client's
`generate(max_new_tokens=...)` (`draw_generation`). Every answer is checked as a client
checks it; what comes back is the evidence, each request and answer byte for byte.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from trustswarm.client.redundant import span_call
from trustswarm.client.routing import Hop
from trustswarm.client.rpc import InvalidAnswer, call_span
from trustswarm.client.session import InferenceSession
from trustswarm.client.swarm import SwarmClient
from trustswarm.protocol import protocols
from trustswarm.protocol.announcement import Announcement
from trustswarm.protocol.evidence import Evidence
from trustswarm.protocol.sessions import SessionError

from .challenges import Challenge

__all__ = ["Generation", "InvalidAnswer", "draw_generation", "probe"]


@dataclass(frozen=True)
class Generation:
    """What a client's generate() does: max_length = prompt + max_new_tokens; the
    prefill and then `decode_steps` one-token steps (max_new_tokens - 1, or fewer when
    a stop token ends it early)."""

    max_new_tokens: int
    decode_steps: int


def draw_generation(
    rng: random.Random, min_new_tokens: int, max_new_tokens: int, early_stop_share: float
) -> Generation:
    """max_new_tokens log-uniform in [min, max]; in `early_stop_share` of the draws the
    generation stops early, uniformly before its last step."""
    low, high = math.log(min_new_tokens), math.log(max_new_tokens + 1)
    new_tokens = min(max_new_tokens, int(math.exp(rng.uniform(low, high))))
    steps = new_tokens - 1
    if steps > 0 and rng.random() < early_stop_share:
        steps = rng.randrange(steps)
    return Generation(new_tokens, steps)


async def probe(
    swarm: SwarmClient,
    server: Announcement,
    challenge: Challenge,
    kind: str,
    max_length: int = 0,
) -> Evidence:
    """Send `challenge` (blocks challenge.start:end) to `server` as the client `swarm`
    would; return the signed exchanges.

    Raises InvalidAnswer for an answer that fails the client's checks (bad signature,
    wrong digests or dtype, a session opened under another id), RemoteError for an error
    frame, and trio.TooSlowError or other errors when the server does not answer.
    """
    if kind == "inference":
        return await _session(swarm, server, challenge, max_length)
    call = span_call(swarm.view, server, challenge.start, challenge.end)
    step = challenge.steps[0]
    tensors = {
        "hidden_states": step.hidden,
        "position_ids": step.positions,
        "attention_mask": step.mask,
    }
    protocol, answer = protocols.FORWARD, "hidden_states"
    if kind == "backward":
        tensors = {**tensors, "grad_outputs": challenge.grad_outputs}
        protocol, answer = protocols.BACKWARD, "grad_inputs"
    await swarm.ensure_connected(call.peer_id)
    _, exchange = await call_span(
        swarm.host,
        call,
        protocol,
        kind,
        tensors,
        answer,
        swarm.view.request_timeout,
        pool=swarm.streams,
    )
    return Evidence((exchange,))


async def _session(
    swarm: SwarmClient, server: Announcement, challenge: Challenge, max_length: int
) -> Evidence:
    max_length = max(max_length, challenge.total_tokens)
    session = InferenceSession(swarm, challenge.start, challenge.end, max_length, 1, pinned=True)
    try:
        await session.open_on([Hop(server, challenge.start, challenge.end)])
    except SessionError as exc:  # not a lost stream or a declined session: a bad answer
        raise InvalidAnswer(f"inference open answer fails the client's checks: {exc}") from None
    transcript = session.hops[0].transcript
    try:
        for answered, step in enumerate(challenge.steps):
            try:
                await session.step(step.hidden, step.positions, step.mask)
            except Exception:
                if len(transcript) > answered:
                    # Signed and checked, then refused by the client (the wrong shape):
                    # still evidence; the judge's comparison turns it into proof.
                    break
                raise
    finally:
        await session.close()
    return Evidence(tuple(transcript))
