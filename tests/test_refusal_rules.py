"""Rules for refused checks and check picking (issue 11), as properties: refusals cost a
server the confidence of its passes and its pick weight, never raise anything, and
servers that keep refusing cannot crowd out the checks of the others. Also the ledger
that keeps refusals, and the client-like generation lengths of inference checks."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trustswarm.reputation.errors import ReputationError
from trustswarm.reputation.refusals import RefusalLedger, with_refusals
from trustswarm.reputation.score import BANNED, OK, PROBATION, ScoreModel
from trustswarm.reputation.store import ReputationStore
from trustswarm.verifier.picking import (
    PickError,
    PickInput,
    base_weight,
    pick_weights,
    refusing,
)
from trustswarm.verifier.probe import draw_generation

SETTINGS = settings(max_examples=300, deadline=None)
MODEL = ScoreModel()
ORDER = {BANNED: 0, PROBATION: 1, OK: 2}
evidence = st.floats(min_value=0, max_value=1e5, allow_nan=False)
positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
models = st.builds(
    ScoreModel,
    prior_pass=positive,
    prior_fail=positive,
    probation_evidence=st.floats(min_value=0, max_value=100),
    ok_threshold=st.floats(min_value=0, max_value=1),
    failure_weight=positive,
    refusal_weight=positive,
)
items = st.builds(PickInput, answered=evidence, refusals=evidence)
shares = st.floats(min_value=0.01, max_value=1.0)


# -- score -------------------------------------------------------------------------------


def test_documented_numbers() -> None:
    assert MODEL.answered_passes(100, 0, 1) == pytest.approx(99.0099, rel=1e-4)
    assert MODEL.answered_passes(5, 0, 20) == pytest.approx(1.0)
    assert MODEL.state(5, 0, False) == OK
    assert MODEL.state_with_refusals(5, 0, 20, False) == PROBATION
    assert MODEL.decay_refusals(4.0, 2 * MODEL.refusal_half_life) == pytest.approx(1.0)


@SETTINGS
@given(models, evidence, evidence)
def test_no_refusals_change_nothing(model: ScoreModel, passes: float, failures: float) -> None:
    assert model.score_with_refusals(passes, failures, 0) == model.score(passes, failures)
    for banned in (False, True):
        assert model.state_with_refusals(passes, failures, 0, banned) == model.state(
            passes, failures, banned
        )


@SETTINGS
@given(models, evidence, evidence, evidence, evidence)
def test_refusals_never_help(
    model: ScoreModel, passes: float, failures: float, refusals: float, extra: float
) -> None:
    answered = model.answered_passes(passes, failures, refusals)
    assert 0 <= answered <= passes * (1 + 1e-6)  # decayed sums: float slack (a 2e-8 case seen)
    score = model.score_with_refusals(passes, failures, refusals)
    assert 0 < score < 1
    assert score <= model.score(passes, failures) * (1 + 1e-12)
    assert model.score_with_refusals(passes, failures, refusals + extra) <= score * (1 + 1e-12)
    state = ORDER[model.state_with_refusals(passes, failures, refusals, False)]
    assert state <= ORDER[model.state(passes, failures, False)]
    assert ORDER[model.state_with_refusals(passes, failures, refusals + extra, False)] <= state
    assert model.state_with_refusals(passes, failures, refusals, True) == BANNED


@SETTINGS
@given(models, evidence, evidence, evidence, evidence)
def test_passes_and_failures_keep_their_direction(
    model: ScoreModel, passes: float, failures: float, refusals: float, extra: float
) -> None:
    score = model.score_with_refusals(passes, failures, refusals)
    assert model.score_with_refusals(passes + extra, failures, refusals) >= score * (1 - 1e-12)
    assert model.score_with_refusals(passes, failures + extra, refusals) <= score * (1 + 1e-12)


@SETTINGS
@given(models, st.floats(min_value=1e-3, max_value=1e4), evidence)
def test_refusing_everything_ends_probation(
    model: ScoreModel, passes: float, failures: float
) -> None:
    """However many passes it had, enough refusals put a server back on probation."""
    assume(model.probation_evidence >= 0.1)
    enough = 2 * passes * passes / (model.refusal_weight * model.probation_evidence) + 1
    assert model.answered_passes(passes, failures, enough) < model.probation_evidence
    assert model.state_with_refusals(passes, failures, enough, False) == PROBATION


def test_bad_model_settings_are_refused() -> None:
    with pytest.raises(ReputationError):
        ScoreModel(refusal_weight=0)
    with pytest.raises(ReputationError):
        ScoreModel(refusal_half_life=-1)
    with pytest.raises(ReputationError):
        MODEL.answered_passes(1, 0, math.nan)


# -- picking -----------------------------------------------------------------------------


@SETTINGS
@given(st.lists(items, min_size=1, max_size=30), shares)
def test_every_server_keeps_a_chance(servers: list[PickInput], share: float) -> None:
    weights = pick_weights(servers, share)
    assert len(weights) == len(servers) and all(w > 0 for w in weights)


@SETTINGS
@given(st.lists(items, min_size=1, max_size=30), shares)
def test_refusing_servers_cannot_crowd_out_the_others(
    servers: list[PickInput], share: float
) -> None:
    weights = pick_weights(servers, share)
    flags = [refusing(s) for s in servers]
    refusing_total = sum(w for w, f in zip(weights, flags, strict=True) if f)
    if not all(flags):
        assert refusing_total <= share * sum(weights) * (1 + 1e-9)
    for server, weight, flag in zip(servers, weights, flags, strict=True):
        if not flag:  # the others keep their weights
            assert weight == base_weight(server)
        assert weight <= base_weight(server)


@SETTINGS
@given(st.lists(items, max_size=20), items, evidence, shares)
def test_refusals_cost_pick_weight(
    others: list[PickInput], server: PickInput, extra: float, share: float
) -> None:
    before = pick_weights([server, *others], share)[0]
    more = PickInput(server.answered, server.refusals + extra)
    after = pick_weights([more, *others], share)[0]
    assert after <= before * (1 + 1e-12)
    assert base_weight(more) <= 1 / (1 + more.refusals)


@SETTINGS
@given(st.integers(min_value=1, max_value=200), st.integers(min_value=2, max_value=500), shares)
def test_many_refusing_identities(honest: int, sybils: int, share: float) -> None:
    """Sybils that refuse every check: their share of picks stays capped."""
    servers = [PickInput(50, 0)] * honest + [PickInput(0, 1)] * sybils
    weights = pick_weights(servers, share)
    assert sum(weights[honest:]) <= share * sum(weights) * (1 + 1e-9)


def test_pick_input_is_validated() -> None:
    with pytest.raises(PickError):
        PickInput(-1, 0)
    with pytest.raises(PickError):
        PickInput(0, math.inf)
    with pytest.raises(PickError):
        pick_weights([PickInput(0, 0)], 0.0)


# -- the ledger --------------------------------------------------------------------------


def test_ledger_decays_persists_and_discounts(store_url: str) -> None:
    url = store_url  # a SQLite file, then a real PostgreSQL database
    store = ReputationStore(url)
    ledger = RefusalLedger(store.engine, store.model)
    now = 1_000_000.0
    for i in range(6):
        store.record_check("p", "m", 0, 4, "forward", True, at=now + i)
    assert ledger.record("p", "m", "busy", at=now + 10) == pytest.approx(1.0)
    half = now + 10 + store.model.refusal_half_life
    assert ledger.weight("p", "m", now=half) == pytest.approx(0.5)
    ledger.record("p", "m", "busy", at=half)
    assert ledger.weight("p", "m", now=half) == pytest.approx(1.5)
    store.close()
    store = ReputationStore(url)  # a restarted verifier keeps them
    ledger = RefusalLedger(store.engine, store.model)
    assert ledger.count("p", "m") == 2 and ledger.weights("m", now=half) == pytest.approx(
        {"p": 1.5}
    )
    rep = store.get("p", "m", now=now + 10)
    assert rep.state == OK
    worse = with_refusals(rep, 20.0, store.model)
    assert worse.state == PROBATION and worse.score < rep.score
    assert with_refusals(rep, 0.0, store.model) == rep
    store.close()


# -- generation lengths ------------------------------------------------------------------


def test_generations_are_drawn_like_clients() -> None:
    rng = random.Random(0)
    draws = [draw_generation(rng, 2, 64, 0.25) for _ in range(20_000)]
    assert all(2 <= d.max_new_tokens <= 64 for d in draws)
    assert all(0 <= d.decode_steps <= d.max_new_tokens - 1 for d in draws)
    lengths = {d.max_new_tokens for d in draws}
    assert len(lengths) > 50  # not a handful of fixed extras
    late = sum(d.decode_steps >= 7 for d in draws) / len(draws)
    assert 0.35 < late < 0.65
    full = sum(d.decode_steps == d.max_new_tokens - 1 for d in draws) / len(draws)
    assert 0.7 < full < 0.85
