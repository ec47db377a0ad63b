"""What an upstream's failure looks like to the router: the next candidate may serve."""

from __future__ import annotations

from typing import Literal

# What a failure says, and so what the router does with it (issue 13):
# - "upstream": the endpoint is down or broken for every caller (refused or broken
#   connection, a timeout, a gateway's 502/503/504). It counts toward the endpoint's
#   circuit, once per request however often the request tried it.
# - "request": this request failed there (a 500: a caller's odd input can cause one). The
#   next candidate gets the request, this endpoint not again, and no circuit moves: one
#   caller's bad request must not take a capability away from the others.
# - "busy": a 429. Tried again after its Retry-After; nobody's fault.
Blame = Literal["upstream", "request", "busy"]
GATEWAY_STATUSES = frozenset({502, 503, 504})


class UpstreamFailed(Exception):
    """A candidate could not serve the call; the next one may."""

    def __init__(self, reason: str, *, kind: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # for metrics: connect, timeout, http_429, http_5xx, http_500, ...
        self.retry_after = retry_after  # what a 429 asked; None: the candidate is broken

    @property
    def blame(self) -> Blame:
        if self.kind == "http_429":
            return "busy"
        return "request" if self.kind == "http_500" else "upstream"


def failed_answer(status: int, retry_after: str | None) -> UpstreamFailed | None:
    """The failure an upstream's HTTP answer means, or None: an answer to pass back (a
    success, or a 4xx other than 429, which is the caller's to read)."""
    if status == 429:
        return UpstreamFailed(
            "HTTP 429", kind="http_429", retry_after=retry_after_seconds(retry_after)
        )
    if status >= 500:
        kind = "http_5xx" if status in GATEWAY_STATUSES else "http_500"
        return UpstreamFailed(f"HTTP {status}", kind=kind)
    return None


def retry_after_seconds(value: str | None) -> float:
    """A ``Retry-After`` header in seconds (0 when absent or not a number of seconds)."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
