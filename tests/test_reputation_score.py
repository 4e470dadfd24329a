"""The Beta reputation model: bounded, monotone, forgetting, probation, bans."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustswarm.reputation.errors import ReputationError
from trustswarm.reputation.score import BANNED, OK, PROBATION, ScoreModel

SETTINGS = settings(max_examples=200, deadline=None)
MODEL = ScoreModel()
evidence = st.floats(min_value=0, max_value=1e6, allow_nan=False)
positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
models = st.builds(
    ScoreModel,
    prior_pass=positive,
    prior_fail=positive,
    half_life=st.floats(min_value=1.0, max_value=1e8),
    probation_evidence=st.floats(min_value=0, max_value=100),
    ok_threshold=st.floats(min_value=0, max_value=1),
    failure_weight=positive,
)


def test_defaults_documented_numbers() -> None:
    assert MODEL.score(0, 0) == 0.5
    assert MODEL.state(0, 0, banned=False) == PROBATION
    assert MODEL.state(5, 0, banned=False) == OK  # 6/7
    assert MODEL.score(5, 1) == pytest.approx(0.5)
    assert MODEL.state(5, 1, banned=False) == PROBATION
    assert MODEL.score(0, 1) == pytest.approx(1 / 7)
    # A server tampering with 20 % of answers ends below the default client threshold.
    assert MODEL.score(800, 200) < 0.5
    assert MODEL.decay(8.0, 3 * MODEL.half_life) == pytest.approx(1.0)


@SETTINGS
@given(models, evidence, evidence)
def test_bounded(model: ScoreModel, passes: float, failures: float) -> None:
    assert 0.0 < model.score(passes, failures) < 1.0


@SETTINGS
@given(models, evidence, evidence, evidence)
def test_monotone_in_evidence(
    model: ScoreModel, passes: float, failures: float, extra: float
) -> None:
    base = model.score(passes, failures)
    assert model.score(passes + extra, failures) >= base
    assert model.score(passes, failures + extra) <= base
    order = {BANNED: 0, PROBATION: 1, OK: 2}
    state = order[model.state(passes, failures, False)]
    assert order[model.state(passes + extra, failures, False)] >= state
    assert order[model.state(passes, failures + extra, False)] <= state


@SETTINGS
@given(models, evidence, evidence, st.floats(min_value=0, max_value=1e9))
def test_decay_moves_toward_prior(
    model: ScoreModel, passes: float, failures: float, age: float
) -> None:
    decayed_p, decayed_f = model.decay(passes, age), model.decay(failures, age)
    assert 0 <= decayed_p <= passes and 0 <= decayed_f <= failures
    before, after = model.score(passes, failures), model.score(decayed_p, decayed_f)
    prior = model.prior_mean
    assert abs(after - prior) <= abs(before - prior) + 1e-12
    assert (after - prior) * (before - prior) >= -1e-15  # never crosses the prior
    # Forever-old evidence is no evidence.
    assert model.score(model.decay(passes, math.inf), model.decay(failures, math.inf)) == (
        pytest.approx(prior)
    )


@SETTINGS
@given(models, evidence, evidence)
def test_new_identity_on_probation_and_banned_stays_banned(
    model: ScoreModel, passes: float, failures: float
) -> None:
    if model.probation_evidence > 0:
        assert model.state(0, 0, banned=False) == PROBATION
        assert model.state(0, failures, banned=False) == PROBATION
    assert model.state(passes, failures, banned=True) == BANNED
    assert model.published_score(passes, failures, banned=True) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prior_pass": 0},
        {"prior_fail": -1},
        {"half_life": math.nan},
        {"failure_weight": math.inf},
        {"ok_threshold": 1.5},
        {"probation_evidence": -1},
    ],
)
def test_bad_parameters_rejected(kwargs: dict) -> None:
    with pytest.raises(ReputationError):
        ScoreModel(**kwargs)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_evidence_rejected(bad: float) -> None:
    with pytest.raises(ReputationError):
        MODEL.score(bad, 0)
    with pytest.raises(ReputationError):
        MODEL.score(0, bad)
