"""Admission control: refuse work the server cannot finish in time, at once, instead of queueing it.

A request's wait is the model time of the requests ahead of it. The server knows how many there are
(uploaded and decoding, queued or in the running batch: :attr:`MicroBatcher.work_ahead`) and measures
what each costs: :class:`ModelTimeEstimator` keeps an exponentially weighted ratio of model seconds to
requests over recent micro-batches, which is the model's *throughput* at the batch sizes the load
actually produces (a batch of 16 costs far less than 16 batches of 1, so a per-batch latency would
overestimate the wait under load, exactly when it matters). The estimated wait of a new request is
then ``work ahead x seconds per request``; when it exceeds the budget the request is refused with 503
and a ``Retry-After`` of about the time the excess needs to drain. The check runs twice: from the
headers, before the body is read (a request that arrives while the queue is already too long costs
nothing more), and again when the upload is complete, which is what sheds a burst whose requests all
arrive at an empty queue. Uploads still arriving are not work ahead (a slow client must not make the
server refuse everyone else) and do not count against the hard cap ``max_queue`` on work ahead, checked
from the headers: what they hold (memory, time, slots for slow clients) is bounded by
``service.upload_budget`` instead.

The mix of options matters (beam 5 costs more than greedy); the ratio follows the recent mix, and the
queue deadline (``queue_timeout_s``, enforced by the batcher) bounds the error of any estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_PER_BATCH = 0.8  # the estimate's memory: a batch's weight halves about every three batches


class ModelTimeEstimator:
    """Model seconds per request, exponentially weighted over recent micro-batches (weighted by size)."""

    def __init__(self, decay: float = DECAY_PER_BATCH) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._seconds = 0.0
        self._requests = 0.0

    def observe(self, requests: int, seconds: float) -> None:
        """One micro-batch of ``requests`` took ``seconds`` of model time."""
        self._seconds = self.decay * self._seconds + seconds
        self._requests = self.decay * self._requests + requests

    @property
    def seconds_per_request(self) -> float | None:
        """None until a batch has been observed."""
        return self._seconds / self._requests if self._requests > 0 else None

    def wait_s(self, outstanding: int) -> float:
        """The estimated wait behind ``outstanding`` requests (0 before any batch was measured)."""
        per_request = self.seconds_per_request
        return outstanding * per_request if per_request is not None else 0.0


@dataclass(frozen=True)
class Refusal:
    reason: str  # "over_budget" or "queue_full", the metric's label
    message: str
    retry_after_s: int


class AdmissionControl:
    """Decides whether a request may go on: once from its headers, again when its upload is complete."""

    def __init__(self, estimator: ModelTimeEstimator, *, budget_s: float, max_queue: int) -> None:
        self.estimator = estimator
        self.budget_s = budget_s
        self.max_queue = max_queue

    def refuse(self, work_ahead: int, *, check_cap: bool = True) -> Refusal | None:
        """None to admit; else why not, and when to retry.

        ``work_ahead``: requests with their upload complete (decoding, queued, running), which the new one
        would wait behind. ``check_cap``: also refuse when they are ``max_queue`` already (the check from the
        headers; the check after the upload leaves it out, the request having come this far).
        """
        per_request = self.estimator.seconds_per_request or 0.0
        if check_cap and work_ahead >= self.max_queue:
            return Refusal(
                "queue_full",
                f"the server is at capacity ({work_ahead} requests decoding, queued or running, the limit is "
                f"{self.max_queue}); retry later",
                _retry_after(work_ahead * per_request),
            )
        wait = self.estimator.wait_s(work_ahead)
        if wait > self.budget_s:
            return Refusal(
                "over_budget",
                f"the server is overloaded (estimated wait {wait:.1f} s, the budget is {self.budget_s:g} s); "
                "retry later",
                _retry_after(wait - self.budget_s),
            )
        return None


def _retry_after(seconds: float) -> int:
    """Whole seconds for the Retry-After header, at least 1."""
    return max(1, math.ceil(seconds))
