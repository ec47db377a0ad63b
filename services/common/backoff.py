"""Exponential backoff with full jitter (AWS's "Exponential Backoff and Jitter"): retries
of many clients spread out instead of arriving together."""

from __future__ import annotations

from collections.abc import Callable

BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0


def backoff_delay(
    attempt: int,
    random: Callable[[], float],
    *,
    base: float = BACKOFF_BASE_SECONDS,
    cap: float = BACKOFF_CAP_SECONDS,
) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (attempt counts from 0)."""
    return random() * min(cap, base * 2 ** min(attempt, 32))
