"""Process-level tuning for CPU inference.

glibc's malloc and torch on a worker thread
-------------------------------------------
A torch tensor's memory comes from ``malloc``. glibc serves allocations above its mmap threshold
(128 KiB, raised dynamically up to 32 MiB as such blocks are freed) with a fresh ``mmap`` and gives
them back with ``munmap`` on free, and it returns the free top of its heaps to the kernel once it is
larger than the trim threshold. Every run of the encoder and the beam-search decoder allocates and
frees the same tensors, so at those defaults the process keeps asking the kernel for pages it just
gave back, and each fresh page costs a zero-filled page fault.

It matters most off the main thread. A thread that is not the main one allocates from its own malloc
arena, whose heaps are trimmed eagerly; the service runs all torch work on such a thread. Measured
on this project's 2-core test VM with the cross-entropy default model (beam 3, one image, 2 torch threads;
medians of 4 interleaved process runs):

================================  ==============
where the encoder + decoder run   ms per image
================================  ==============
main thread, glibc defaults       52
worker thread, glibc defaults     67 (4,700 page faults per image)
worker thread, tuned              47
main thread, tuned                50
================================  ==============

:func:`tune_malloc` fixes both thresholds (which also switches off glibc's dynamic adjustment), so
freed tensor memory stays in the process for the next request. The cost is memory the process keeps
instead of returning: a thread's arena keeps what its blocks below the mmap threshold took at their
peak (see below). The same can be had without code through glibc's environment variables
(``MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=134217728``; set to 1 GiB they gave the
same 47 ms); preloading jemalloc or tcmalloc should too (not measured here).

Large images
------------
Every thread that decodes images (the service's decode threads, a bulk run's pool, DataLoader
workers' threads) has its own malloc arena too, and that arena practically never gives memory back:
glibc returns free memory only from the top of an arena's heap, and for an arena other than the main
one only once that free top is larger than the trim threshold, which at 128 MiB never happens in its
heaps of at most 64 MiB. Blocks above the mmap threshold are not at risk: each is its own mapping,
unmapped when freed.

Pillow used to put a large image there piece by piece: it mallocs an image's pixels in blocks of up to
16 MiB, below the mmap threshold (64 MiB here, and glibc's own rises to 16 MiB once the first such
block is freed). So every decoding thread kept the working set of the largest image it had decoded:
a 36-megapixel CMYK JPEG, decoded whole into ~144 MB of CMYK and ~144 MB of RGB, left ~290 MB per
thread for the life of the process. Two changes in :mod:`captioner.transforms` end that:

* JPEGs of every mode are decoded at the scale the encoder needs (the CMYK one: 920x614, ~2 MB);
* images are allocated in one block each (:func:`captioner.transforms.allocate_images_whole`), so
  one larger than the mmap threshold is its own mapping and goes back to the system when freed.

Images whose pixels are smaller than the mmap threshold (under 16 megapixels of RGB at 64 MiB) still
stay in their thread's arena once freed, where the next image reuses them. The price of giving a
larger one back is that the next gets fresh pages from the kernel, page faults included;
``bench/large_images.py`` measures both.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

DEFAULT_MMAP_THRESHOLD = 64 * 1024 * 1024  # the value measured in the table above
MAX_THRESHOLD = 1024 * 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols the process already has, libc's among them
    except OSError:
        return None
    # glibc only: musl (Alpine) has no such thresholds to set
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def tune_malloc(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int | None = None) -> bool:
    """Keep freed tensor memory for reuse (see the module docstring); ``True`` when glibc took it.

    ``trim_threshold`` defaults to twice ``mmap_threshold``. Returns ``False``, changing nothing, on a
    C library other than glibc. Process-wide: call it once, before the model's first run.
    """
    trim_threshold = 2 * mmap_threshold if trim_threshold is None else trim_threshold
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 < value <= MAX_THRESHOLD:  # mallopt takes an int
            raise ValueError(f"{name} must be in (0, {MAX_THRESHOLD}] bytes, got {value}")
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: malloc left as it is")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    if not ok:
        log.warning("glibc refused the malloc thresholds (mmap %d, trim %d bytes)", mmap_threshold, trim_threshold)
    return ok
