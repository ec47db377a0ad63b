"""What an upstream's failure looks like to the router: the next candidate may serve."""

from __future__ import annotations


class UpstreamFailed(Exception):
    """A candidate could not serve the call; the next one may."""

    def __init__(self, reason: str, *, kind: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # for metrics: connect, timeout, http_429, http_5xx, no_key, ...
        self.retry_after = retry_after  # what a 429 asked; None: the candidate is broken


def retry_after_seconds(value: str | None) -> float:
    """A ``Retry-After`` header in seconds (0 when absent or not a number of seconds)."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
