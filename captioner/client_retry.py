"""When :mod:`captioner.client` tries a request again, and how long it waits first: :class:`RetryPolicy`.

The policy only decides (from an attempt's answer or error, the ``Retry-After`` and proxy headers, and the time
already waited); the sync and async clients carry its decisions out, sleeping and sending as it says, so both
follow one rule. Nothing here sleeps or sends.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from dataclasses import dataclass, field
from typing import NamedTuple

try:
    import httpx
except ImportError as exc:
    raise ImportError("captioner.client needs httpx; install it with: pip install 'captioner[client]'") from exc

RETRY_STATUSES = frozenset((429, 503))  # "come back later": the server said so, the request itself was fine
BACKOFF_START = 0.5  # seconds: the first backoff window, doubled at every attempt
RETRY_AFTER_FLOOR = 1.0  # seconds: the shortest wait after a 503/429, whatever its Retry-After says
# Set by the proxy in front (deploy/nginx/captioner.conf): the status of every upstream try, in order ("503, 503").
UPSTREAM_STATUS_HEADER = "X-Captioner-Upstream-Status"

# Failures worth another try: the request may never have reached the server, or it restarted mid-way.
# UnsupportedProtocol and LocalProtocolError are this side's mistakes and would fail the same way again.
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)


class Decision(NamedTuple):
    """What to do after an attempt: wait ``wait`` seconds and try again, or (``wait`` None) end the call."""

    wait: float | None
    reason: str = ""  # why a failure that could succeed later is not tried again; "" when no retries are left


_FINAL = Decision(None)  # an answer that is the call's result: a success, or a failure that would repeat


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed attempt is tried again and how long the client waits first; the one rule for the sync and
    async clients, which only carry it out.

    Every wait is drawn at random, so that clients refused at the same moment do not all come back at the same
    moment (a fixed wait keeps them in lockstep however long it is):

    - no answer (refused, reset, timed out): "full jitter", uniform in ``[0, min(max_retry_wait, 0.5 s * 2**attempt)]``;
    - 503 or 429: never sooner than the server asked, uniform in ``[R, 2R]`` (at most ``max_retry_wait``), where R
      is its ``Retry-After`` raised to :data:`RETRY_AFTER_FLOOR` (so ``0``, a negative number, a past date or text
      that is no number all mean the floor), or the doubling backoff, floored, when it sent none. Clients told the
      same R come back spread over R seconds: the spread grows with R, as a longer R means more work queued. A
      ``Retry-After`` over ``max_retry_wait`` is not waited for at all: the call ends at once with the server's error;
    - a 503 or 429 that the proxy in front already sent to more than one upstream (it lists every try's status in
      :data:`UPSTREAM_STATUS_HEADER`) is not tried again: the proxy's retry was its retry, and another round would
      multiply the load on replicas that are all shedding it.

    The waits of one call add up to at most ``retry_budget`` seconds: a wait drawn longer than what is left of it
    is not taken, and the call ends with the last error.
    """

    retries: int  # extra attempts after the first
    max_retry_wait: float  # seconds: the longest single wait, and the longest Retry-After the client will honour
    retry_budget: float  # seconds: the most one call waits between its attempts, all waits together
    rng: random.Random = field(compare=False, repr=False)  # the jitter's random source (seeded in tests)

    def decide(
        self, attempt: int, waited: float, *, response: httpx.Response | None = None, error: Exception | None = None
    ) -> Decision:
        """After attempt number ``attempt`` (from 0) got ``response`` or raised ``error``, with ``waited`` seconds
        already spent waiting in this call: how long to wait before the next attempt, or why there is none."""
        if error is not None:
            if not isinstance(error, TRANSIENT_ERRORS):
                return _FINAL
        else:
            assert response is not None
            if response.status_code not in RETRY_STATUSES:
                return _FINAL
        if attempt >= self.retries:
            return Decision(None)
        if response is None:
            low, high = 0.0, min(self.max_retry_wait, _backoff(attempt))
        else:
            tries = _upstream_tries(response)
            if tries > 1:
                return Decision(None, f"the proxy in front already tried {tries} upstreams")
            asked = _retry_after(response.headers.get("Retry-After"))
            if asked is None:
                low = max(RETRY_AFTER_FLOOR, min(self.max_retry_wait, _backoff(attempt)))
            else:
                low = max(RETRY_AFTER_FLOOR, asked)
            if low > self.max_retry_wait:
                if asked is not None and asked > self.max_retry_wait:
                    over = f"Retry-After {_seconds(asked)} s"
                else:
                    over = f"the {RETRY_AFTER_FLOOR:g} s floor of a 503/429 wait"
                return Decision(None, f"{over} is over max_retry_wait {self.max_retry_wait:g} s")
            high = min(self.max_retry_wait, 2 * low)
        wait = self.rng.uniform(low, high)
        if waited + wait > self.retry_budget:
            return Decision(None, f"waiting {wait:.2f} s more would pass the retry budget of {self.retry_budget:g} s")
        return Decision(wait)


def gave_up(attempts: int, reason: str = "") -> str:
    """How a call that ended in failure ended, for its error's message: ``gave up after 3 attempts: <reason>``."""
    return f"gave up after {attempts} attempt{'' if attempts == 1 else 's'}" + (f": {reason}" if reason else "")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if seconds == seconds else None  # NaN is unreadable too


def _upstream_tries(response: httpx.Response) -> int:
    """How many upstreams the proxy in front sent this request to: the statuses it lists in
    :data:`UPSTREAM_STATUS_HEADER` (nginx separates tries with ", " and internal redirects with " : "); 0 without it."""
    return sum(1 for part in re.split(r"[,:]", response.headers.get(UPSTREAM_STATUS_HEADER, "")) if part.strip())


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 1000 else f"{value:g}"  # a far HTTP date: 2299950000, not 2.29995e+09


def _backoff(attempt: int) -> float:
    return BACKOFF_START * 2 ** min(attempt, 30)
