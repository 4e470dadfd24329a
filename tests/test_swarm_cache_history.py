"""Client histories (SwarmCache's record of every row's inputs, each hop's replay history)
grow in a buffer instead of a cat per step (client/history.py): they must hold exactly
what a cat would, through steps of any size, reorders (beam search), replays and a
session reopened larger."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.client.generation import SwarmCache
from trustswarm.client.history import GrowingHistory

HIDDEN = 3


class EchoSession:
    """The StepSession interface, computing nothing: its output is its input, so what
    the cache sends (new steps and replays) is what the test sees."""

    def __init__(self, max_length: int, rows: int) -> None:
        self.max_length, self.rows, self.length, self.sent = max_length, rows, 0, []

    def step(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
        assert hidden.shape[0] == self.rows and self.length + hidden.shape[1] <= self.max_length
        self.length += hidden.shape[1]
        self.sent.append((hidden.clone(), positions.clone()))
        return hidden

    def close(self) -> None:
        pass


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3),
    max_length=st.integers(1, 12),
    ops=st.lists(st.one_of(st.integers(1, 5), st.just("reorder")), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_history_equals_concatenation(rows: int, max_length: int, ops: list, seed: int):
    gen = torch.Generator().manual_seed(seed)
    sessions: list[EchoSession] = []

    def open_session(length: int, batch: int) -> EchoSession:
        sessions.append(EchoSession(length, batch))
        return sessions[-1]

    cache = SwarmCache(open_session, max_length)
    want_inputs = torch.empty(rows, 0, HIDDEN)
    want_positions = torch.empty(rows, 0, dtype=torch.long)
    for op in ops:
        if op == "reorder":
            idx = torch.randint(0, rows, (rows,), generator=gen)
            cache.reorder_cache(idx)
            want_inputs, want_positions = want_inputs[idx], want_positions[idx]
            continue
        seen = want_inputs.shape[1]
        embeds = torch.randn(rows, op, HIDDEN, generator=gen)
        positions = torch.arange(seen, seen + op).unsqueeze(0)
        out = cache.step(embeds, positions, torch.ones(rows, seen + op, dtype=torch.long))
        assert torch.equal(out, embeds)  # the new tokens' outputs only, even after a replay
        want_inputs = torch.cat([want_inputs, embeds], dim=1)
        want_positions = torch.cat([want_positions, positions.expand(rows, -1)], dim=1)
        assert torch.equal(cache.inputs, want_inputs)
        assert torch.equal(cache.positions, want_positions)
        assert cache.get_seq_length() == want_inputs.shape[1]
        # a fresh session was sent the whole history in one replay step
        first_hidden, first_positions = sessions[-1].sent[0]
        if len(sessions[-1].sent) == 1:
            assert torch.equal(first_hidden, want_inputs)
            assert torch.equal(first_positions, want_positions)
    cache.reset()
    assert cache.inputs is None and cache.get_seq_length() == 0


def test_a_decode_step_does_not_copy_the_history():
    cache = SwarmCache(lambda length, batch: EchoSession(length, batch), 64)
    cache.step(torch.randn(1, 8, HIDDEN), torch.arange(8)[None], torch.ones(1, 8))
    cache.step(torch.randn(1, 1, HIDDEN), torch.tensor([[8]]), torch.ones(1, 9))
    storage = cache.inputs.untyped_storage().data_ptr()
    for t in range(9, 40):
        cache.step(torch.randn(1, 1, HIDDEN), torch.tensor([[t]]), torch.ones(1, t + 1))
        assert cache.inputs.untyped_storage().data_ptr() == storage  # appended in place
    assert cache.get_seq_length() == 40


@settings(max_examples=80, deadline=None)
@given(
    steps=st.lists(
        st.one_of(st.integers(1, 6), st.just("replace"), st.just("retype")), max_size=15
    ),
    rows=st.integers(1, 3),
    hint=st.integers(0, 20),
)
def test_growing_history_equals_concatenation(steps: list, rows: int, hint: int):
    history, owner = GrowingHistory(), None  # owner: the attribute a session keeps
    want: torch.Tensor | None = None
    dtype = torch.float32
    for step in steps:
        if step == "replace" and want is not None:  # the owner swaps in other rows
            want = owner = want.flip(0).clone()
            continue
        if step == "retype":
            dtype = torch.float64 if dtype == torch.float32 else torch.float32
            continue
        if step == "replace":
            continue
        part = torch.randn(rows, step, 2, dtype=dtype)
        before = part.clone()
        owner = history.append_to(owner, part, hint)
        want = part if want is None else torch.cat([want, part], dim=1)
        assert torch.equal(owner, want) and owner.dtype == want.dtype
        assert torch.equal(part, before)  # the caller's tensor is never written to


def test_growing_history_refuses_other_rows():
    history = GrowingHistory()
    history.append(torch.zeros(2, 1, 3))
    with pytest.raises(ValueError):
        history.append(torch.zeros(1, 1, 3))
    with pytest.raises(ValueError):
        history.append(torch.zeros(2, 1, 4))
