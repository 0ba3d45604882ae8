"""Memory comes back after large images: the real ``captioner-serve`` (issue 24, part 2).

Each decode thread used to keep the working set of the largest image it had decoded for the life of
the process (~290 MB for a 36-megapixel CMYK JPEG); see ``captioner/runtime.py``, "Large images".
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from captioner import runtime
from tests.helpers import write_large_image
from tests.service.server import running_server

CONCURRENT = 8  # the audit's burst
# How much RSS the burst may leave behind, over its level after the first request of each kind: the trim
# threshold, below which glibc keeps the free top of the event loop's arena, where the uploads' bytes are
# read. Measured on the 2-core test VM: the burst added 24 MiB with the fix, 426 MiB without it.
MARGIN_MIB = 128


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


@pytest.mark.slow
@pytest.mark.skipif(runtime._glibc() is None, reason="the arenas at issue are glibc's (and /proc is Linux's)")
def test_large_uploads_leave_no_lasting_memory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A 36-megapixel CMYK JPEG (decoded at reduced scale) and PNG (decoded whole), each once, then a burst
    of eight at once: RSS afterwards stays within the margin of its level after the first of each."""
    uploads = [write_large_image(kind, tmp_path / f"large-{kind}").read_bytes() for kind in ("cmyk-jpeg", "png")]
    with running_server(tiny_checkpoint) as server, httpx.Client(base_url=server.url, timeout=300) as client:

        def caption(data: bytes) -> int:
            return client.post("/caption", files={"image": ("large", data, "application/octet-stream")}).status_code

        assert [caption(data) for data in uploads] == [200, 200], server.log
        after_first = _rss_mib(server.process.pid)
        with ThreadPoolExecutor(CONCURRENT) as pool:
            statuses = list(pool.map(caption, [uploads[i % 2] for i in range(CONCURRENT)]))
        assert statuses == [200] * CONCURRENT, server.log
        after_burst = _rss_mib(server.process.pid)
    grew = after_burst - after_first
    assert grew <= MARGIN_MIB, f"RSS grew {grew:.0f} MiB after the first requests ({after_first:.0f} MiB)"
