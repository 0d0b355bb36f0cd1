"""The claims, in the order of the report. Each module declares its claims (statement, paper anchor,
criterion) at import time — before anything runs — and the experiment that measures them."""

from __future__ import annotations

from ..framework import Claim
from . import batch, ics, optimization, recurrent

ALL: tuple[Claim, ...] = tuple(
    sorted(optimization.CLAIMS + batch.CLAIMS + ics.CLAIMS + recurrent.CLAIMS, key=lambda c: c.id)
)
BY_ID: dict[int, Claim] = {c.id: c for c in ALL}
