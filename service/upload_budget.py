"""What uploads still arriving may hold: memory, time, and a bounded number of slots for slow ones.

An audit of a replica with nothing in front of it found that clients which start an upload and never
finish it could take the server down: 300 connections that sent headers and then nothing held 256
request slots for as long as they liked (every other request got 503), and 150 uploads of 9.9 MB left
unfinished took RSS from 0.84 to 2.55 GB. The rules here bound both, without refusing honest traffic:

* **time**: an upload that sends nothing for ``idle_timeout_s`` is answered 408; past that grace it must
  have averaged ``min_bytes_per_s`` since its body started (a 10 MiB image gets 10 s + 320 s at
  32 KiB/s), else 408. Either way the connection is closed.
* **slow slots**: an upload still arriving after ``slow_after_s`` is *slow* and needs one of ``max_slow``
  slots; when none is free it is answered 503 (retry later) and closed. A photo from a working client
  arrives well within the first seconds, so it never needs a slot: slow clients, however many, only
  compete with each other.
* **memory**: every byte of a request body held in memory counts against ``max_bytes`` (all uploads
  together, from the first byte until the route drops the bytes after decoding); a chunk that would go
  over is refused with 503 and its upload dropped. The bytes counted are those received, not those a
  Content-Length promises, so clients that send nothing cost nothing here.

Requests whose upload is complete are bounded separately, by admission control (``service.admission``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from service.errors import ApiError

MEMORY_NEARLY_FULL = 0.9  # /ready answers 503 from here: send new traffic to another replica
CLOSE = {"Connection": "close"}  # the client may still be sending: the connection cannot be reused


@dataclass(frozen=True)
class UploadRules:
    """The per-upload time rules (see the module docstring)."""

    idle_timeout_s: float = 10.0
    min_bytes_per_s: int = 32 * 1024
    slow_after_s: float = 2.0


class UploadBudget:
    """The shared counts: bytes held by uploads in memory, uploads in progress, slow ones among them."""

    def __init__(self, *, max_bytes: int, max_slow: int, rules: UploadRules) -> None:
        self.max_bytes = max_bytes
        self.max_slow = max_slow
        self.rules = rules
        self.bytes_held = 0
        self.uploads = 0
        self.slow = 0

    @property
    def memory_nearly_full(self) -> bool:
        """Uploads hold 90 % or more of their memory: most new uploads would be refused."""
        return self.bytes_held >= MEMORY_NEARLY_FULL * self.max_bytes

    @property
    def saturation(self) -> str | None:
        """Why uploads would be refused now (``/ready`` reports it), or None."""
        if self.memory_nearly_full:
            return (
                f"uploads hold {self.bytes_held / 2**20:.1f} MiB of the {self.max_bytes / 2**20:g} MiB of memory "
                "allowed them"
            )
        if self.slow >= self.max_slow:
            return f"all {self.max_slow} slots for slow uploads are taken (clients that send slowly or not at all)"
        return None

    @contextmanager
    def upload(self) -> Iterator[Upload]:
        """One request's upload, from its headers until its bytes are dropped: everything it held is given back."""
        upload = Upload(self)
        self.uploads += 1
        try:
            yield upload
        finally:
            self.uploads -= 1
            upload.arrived()
            upload.drop_bytes()


class Upload:
    """One upload's clock and holdings; :meth:`next_deadline` and :meth:`deadline_passed` time its body."""

    def __init__(self, budget: UploadBudget) -> None:
        self.budget = budget
        self.started = time.monotonic()
        self.last_byte = self.started
        self.received = 0
        self.held = 0
        self.is_slow = False

    def hold(self, n: int) -> None:
        """``n`` more bytes of the body are in memory; 503 (the upload is dropped) when that is over the budget."""
        now = time.monotonic()
        self.received += n
        self.last_byte = now
        budget = self.budget
        if budget.bytes_held + n > budget.max_bytes:
            raise ApiError(
                503,
                "overloaded",
                f"the server holds {budget.bytes_held / 2**20:.0f} MiB of uploads, its limit; retry later",
                headers={"Retry-After": "5", **CLOSE},
            )
        budget.bytes_held += n
        self.held += n

    def arrived(self) -> None:
        """The whole body is in: a slow upload gives its slot back (its bytes stay held until dropped)."""
        if self.is_slow:
            self.budget.slow -= 1
            self.is_slow = False

    def drop_bytes(self) -> None:
        self.budget.bytes_held -= self.held
        self.held = 0

    def next_deadline(self) -> float:
        """The ``time.monotonic()`` at which :meth:`deadline_passed` must run if no byte arrives before."""
        rules = self.budget.rules
        deadline = self.last_byte + rules.idle_timeout_s
        if rules.min_bytes_per_s:  # the rate rule's deadline: when the average would fall below the minimum
            deadline = min(deadline, self.started + max(rules.idle_timeout_s, self.received / rules.min_bytes_per_s))
        if not self.is_slow:
            deadline = min(deadline, self.started + rules.slow_after_s)
        return deadline

    def deadline_passed(self) -> None:
        """Called at (or after) :meth:`next_deadline`: 408 when a time rule is broken, 503 when it is slow and
        no slot is free; else it now holds a slow slot and goes on."""
        rules, now = self.budget.rules, time.monotonic()
        if now - self.last_byte >= rules.idle_timeout_s:
            self._timeout(f"the upload sent nothing for {rules.idle_timeout_s:g} s")
        elapsed = now - self.started
        too_slow = self.received < rules.min_bytes_per_s * elapsed
        if rules.min_bytes_per_s and elapsed >= rules.idle_timeout_s and too_slow:
            rate = self.received / elapsed / 1024
            self._timeout(
                f"the upload is too slow ({rate:.1f} KiB/s on average; the minimum is {rules.min_bytes_per_s / 1024:g} "
                "KiB/s)"
            )
        if not self.is_slow and elapsed >= rules.slow_after_s:
            budget = self.budget
            if budget.slow >= budget.max_slow:
                raise ApiError(
                    503,
                    "overloaded",
                    f"too many slow uploads in progress (the limit is {budget.max_slow}); retry later",
                    headers={"Retry-After": str(max(1, math.ceil(rules.idle_timeout_s))), **CLOSE},
                )
            budget.slow += 1
            self.is_slow = True

    def _timeout(self, why: str) -> None:
        raise ApiError(408, "request_timeout", f"{why}; the connection is closed", headers=CLOSE)
