"""Proof needs a margin beyond the tolerance: near-misses are failures, not fraud."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from trustswarm.protocol.comparator import compare
from trustswarm.verifier.judge import PROOF_FACTOR, proof_tolerance

REFERENCE = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(3))


def _verdicts(scale: float) -> tuple[bool, bool]:
    answer = (REFERENCE * scale).to(torch.bfloat16)
    plain = compare(answer, REFERENCE, kind="hidden").agree
    proof = compare(
        answer, REFERENCE, kind="hidden", tolerance=proof_tolerance(answer, REFERENCE, "hidden")
    ).agree
    return plain, proof


def test_a_near_miss_is_wrong_but_not_proven():
    assert _verdicts(1.0) == (True, True)
    assert _verdicts(1.04) == (False, True)  # outside 2.9 %, inside the proof margin
    assert _verdicts(1.10) == (False, False)  # beyond doubt


@given(st.floats(0.0, 0.5))
def test_proof_implies_wrong(error: float):
    plain, proof = _verdicts(1.0 + error)
    assert proof or not plain  # proven wrong (not proof) implies wrong (not plain)


def test_proof_factor_is_above_the_worst_honest_ratio():
    # bench/results/calibration.md: the worst honest bfloat16 pair is 1.67x the threshold.
    assert PROOF_FACTOR >= 1.67
