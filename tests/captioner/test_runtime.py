"""captioner.runtime.tune_malloc: glibc keeps freed tensor memory instead of mmap/munmap-ing it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from captioner import runtime

glibc = pytest.mark.skipif(runtime._glibc() is None, reason="needs glibc (mallopt, mallinfo2)")

# Allocates 8 MiB with malloc and reports whether glibc served it with its own mmap (mallinfo2's
# hblkhd: bytes in mmapped blocks). Runs in a fresh process: the thresholds are process-wide.
_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from captioner import runtime

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    libc = runtime._glibc()
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "tuned":
        assert runtime.tune_malloc(64 * 1024 * 1024)
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(8 * 1024 * 1024)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(block)
    print(mapped)
    """
)


def _mmapped_bytes(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@glibc
def test_tuned_malloc_serves_a_large_block_from_its_heap_not_a_fresh_mmap() -> None:
    assert _mmapped_bytes("default") >= 8 * 1024 * 1024  # glibc's default: mmap above 128 KiB
    assert _mmapped_bytes("tuned") == 0


@pytest.mark.parametrize(("mmap", "trim"), [(0, None), (-1, None), (2**31, None), (1024, -5), (1024, 2**31)])
def test_out_of_range_thresholds_are_refused(mmap: int, trim: int | None) -> None:
    with pytest.raises(ValueError, match="threshold must be in"):
        runtime.tune_malloc(mmap, trim)


def test_without_glibc_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    assert runtime.tune_malloc() is False
