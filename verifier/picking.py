"""Which server the next spot-check goes to: pure rules, no networking.

A server's base weight is 1 / (1 + answered checks + refusals): new identities and
servers with little evidence are checked most, and a refused check (busy, timed out,
not taken) costs pick weight like an answered one, so a server cannot keep the highest
weight for ever by refusing. Every candidate keeps a positive weight: nobody stays
unchecked for ever.

Servers that keep refusing (their decayed refusals outweigh their answered checks) may
together take at most `max_refusing_share` of the picks while other servers are
waiting: their weights are scaled down as a group, the others' are untouched. Many
refusing identities therefore cannot crowd out the checks of the rest (and the
spot-checker runs their checks in a lane of their own, see spotcheck.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trustswarm.protocol.errors import TrustswarmError

REFUSING_MIN = 0.5  # decayed refusals below this do not make a server "refusing"


class PickError(TrustswarmError):
    """Invalid input to the pick rules (a caller bug)."""


@dataclass(frozen=True)
class PickInput:
    answered: float  # checks the server answered (passes + failures)
    refusals: float  # decayed weight of the checks it refused

    def __post_init__(self) -> None:
        for name in ("answered", "refusals"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < float("inf")):
                raise PickError(f"PickInput.{name} must be a finite number >= 0, got {value!r}")


def refusing(item: PickInput) -> bool:
    """It refuses more checks than it answers (and refused recently)."""
    return item.refusals >= REFUSING_MIN and item.refusals > item.answered


def base_weight(item: PickInput) -> float:
    return 1.0 / (1.0 + item.answered + item.refusals)


def pick_weights(items: Sequence[PickInput], max_refusing_share: float) -> list[float]:
    """Selection weights, in order. With both refusing and other servers present, the
    refusing ones' total is at most `max_refusing_share` of the sum."""
    if not 0 < max_refusing_share <= 1:
        raise PickError(f"max_refusing_share must lie in (0, 1], got {max_refusing_share!r}")
    weights = [base_weight(item) for item in items]
    flags = [refusing(item) for item in items]
    refusing_total = sum(w for w, f in zip(weights, flags, strict=True) if f)
    other_total = sum(w for w, f in zip(weights, flags, strict=True) if not f)
    if refusing_total == 0 or other_total == 0 or max_refusing_share == 1:
        return weights
    limit = max_refusing_share / (1 - max_refusing_share) * other_total
    if refusing_total <= limit:
        return weights
    scale = limit / refusing_total
    return [w * scale if f else w for w, f in zip(weights, flags, strict=True)]
