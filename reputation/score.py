"""Beta reputation with exponential forgetting, probation and bans.

The model
---------
A verifier's evidence about one server is two non-negative weights: `passes`
(spot-checks whose answer matched the reference) and `failures` (checks that did
not). With a Beta(alpha0, beta0) prior on "this server answers correctly", the
posterior mean is the score::

    score = (alpha0 + passes) / (alpha0 + beta0 + passes + failure_weight * failures)

* Bounded: with alpha0, beta0 > 0 the score lies strictly inside (0, 1).
* Monotone: more passes never lower it, more failures never raise it.
* Neutral start: with alpha0 = beta0 = 1 a server nobody has checked scores 0.5
  (clients with `min_reputation=0.5` still use it, ranked below established ones).
* `failure_weight` counts one failed check as several passes. An honest server
  running the published weights does not fail a check (the comparator tolerates
  numeric noise), so a failure is strong evidence. With the default 5, a server
  that tampers with 20 % of answers converges to 0.8 / (0.8 + 5 * 0.2) = 0.44,
  under the default client threshold 0.5, and a new identity whose first check
  fails drops to 1 / 7 = 0.14 at once.

Forgetting: evidence loses half its weight every `half_life` seconds
(`decay(w, age) = w * 2 ** (-age / half_life)`), so an old record of good (or
bad) behaviour fades and the score drifts back toward the prior mean
alpha0 / (alpha0 + beta0). A server must keep being checked to stay trusted.

States:

* ``banned``: proven fraud (a signed answer the verifier recomputed and found
  wrong). Permanent for that identity: no amount of later evidence undoes it.
  Its published score is 0.
* ``probation``: fewer than `probation_evidence` (decayed) passes, or a score
  under `ok_threshold`. New identities start here: a cheater cannot shed a bad
  history by making a new key and be treated like an established server.
* ``ok``: enough recent passes and a score of at least `ok_threshold`.

Defaults: alpha0 = beta0 = 1, half-life 7 days, 5 passes to leave probation,
ok threshold 0.8 (5 passes and no failure: 6/7 = 0.86 -> ok; 5 passes and one
failure: 6/12 = 0.5 -> probation).

Refusals: a check the server declined (`busy`, an error frame), let time out or did
not take at all is neither a pass nor a failure, but it is not nothing either: a
server that refuses checks must not keep the confidence its old passes bought (nor
stay "unchecked" for ever). Refusals are a third, decayed weight `refusals` (half-life
`refusal_half_life`, 6 hours: being busy for a while passes) that discounts the pass
evidence by the share of passes among passes and refusals::

    answered_passes = passes * passes / (passes + refusal_weight * refusals)

The score and state are then computed from `answered_passes` instead of `passes`.
With no refusals nothing changes; more refusals never raise the score or improve the
state; a server that refuses most checks loses the credit of its passes: back to
probation, its score back toward the prior (confidence lost, not an accusation: a
refusal proves nothing).
100 passes and 1 refusal still count as 99 passes; 5 passes and 20 refusals as 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ReputationError

OK = "ok"
PROBATION = "probation"
BANNED = "banned"
STATES = (OK, PROBATION, BANNED)
REFUSED = "refused"  # a check outcome: declined (busy), timed out or not taken


@dataclass(frozen=True)
class ScoreModel:
    prior_pass: float = 1.0  # alpha0
    prior_fail: float = 1.0  # beta0 (neutral prior: a new identity scores 0.5)
    half_life: float = 7 * 24 * 3600.0  # seconds; evidence weight halves every half_life
    probation_evidence: float = 5.0  # decayed passes needed before leaving probation
    ok_threshold: float = 0.8  # minimum score for "ok" once out of probation
    failure_weight: float = 5.0  # one failed check counts as this many passes
    refusal_half_life: float = 6 * 3600.0  # seconds; refusals fade faster than evidence
    refusal_weight: float = 1.0  # one refused check offsets this many answered ones

    def __post_init__(self) -> None:
        names = ("prior_pass", "prior_fail", "half_life", "failure_weight")
        for name in (*names, "refusal_half_life", "refusal_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ReputationError(f"ScoreModel.{name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.probation_evidence) and self.probation_evidence >= 0):
            raise ReputationError("ScoreModel.probation_evidence must be >= 0")
        if not 0 <= self.ok_threshold <= 1:
            raise ReputationError("ScoreModel.ok_threshold must lie in [0, 1]")

    @property
    def prior_mean(self) -> float:
        return self.prior_pass / (self.prior_pass + self.prior_fail)

    def score(self, passes: float, failures: float) -> float:
        """Posterior mean of the Beta model; strictly inside (0, 1)."""
        p, f = _evidence(passes), _evidence(failures)
        return (self.prior_pass + p) / (
            self.prior_pass + self.prior_fail + p + self.failure_weight * f
        )

    def decay(self, weight: float, age_seconds: float) -> float:
        """Weight of evidence `age_seconds` old (negative ages, i.e. clock skew, count as 0)."""
        if age_seconds == math.inf:
            return 0.0
        age = age_seconds if math.isfinite(age_seconds) and age_seconds > 0 else 0.0
        return _evidence(weight) * 0.5 ** (age / self.half_life)

    def state(self, passes: float, failures: float, banned: bool) -> str:
        """ "ok", "probation" or "banned" (see the module docstring)."""
        if banned:
            return BANNED
        if _evidence(passes) < self.probation_evidence:
            return PROBATION
        return OK if self.score(passes, failures) >= self.ok_threshold else PROBATION

    def published_score(self, passes: float, failures: float, banned: bool) -> float:
        """The score a verifier publishes: 0 for a banned identity."""
        return 0.0 if banned else self.score(passes, failures)

    # -- refusals (see the module docstring) ------------------------------------------

    def answered_passes(self, passes: float, failures: float, refusals: float) -> float:
        """Pass evidence discounted by the share of passes among passes and refusals
        (failures are counted, and weigh, on their own)."""
        p, r = _evidence(passes), _evidence(refusals)
        _evidence(failures)
        if r == 0 or p == 0:
            return p
        return p * p / (p + self.refusal_weight * r)

    def score_with_refusals(self, passes: float, failures: float, refusals: float) -> float:
        return self.score(self.answered_passes(passes, failures, refusals), failures)

    def state_with_refusals(
        self, passes: float, failures: float, refusals: float, banned: bool
    ) -> str:
        return self.state(self.answered_passes(passes, failures, refusals), failures, banned)

    def decay_refusals(self, weight: float, age_seconds: float) -> float:
        """Weight of refusals `age_seconds` old (half-life `refusal_half_life`)."""
        if age_seconds == math.inf:
            return 0.0
        age = age_seconds if math.isfinite(age_seconds) and age_seconds > 0 else 0.0
        return _evidence(weight) * 0.5 ** (age / self.refusal_half_life)


def _evidence(value: float) -> float:
    """Evidence weights are finite and non-negative; anything else is a caller bug."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ReputationError(f"evidence weight must be a finite number >= 0, got {value!r}")
    return float(value)
