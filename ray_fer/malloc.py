"""glibc's malloc, told to keep freed memory in the processes that move frames and photos.

By default glibc gives a freed block of more than 128 KB (up to 32 MB as it adapts) back to the
system, so the next batch's arrays are fresh pages that the kernel must zero and map on first
touch. Labelling a 1080p video on 2 cores, the kernel's page zeroing (`clear_page_erms`) took 28%
of all CPU time (perf, system-wide, over the steady part of a 5-minute video): 16 points in the
decode tasks (each sampled frame's 2.7 MB of copies, allocated and freed frame after frame) and 11
in the predictor actors (the detector's activations: 12 MB of fresh memory per frame, measured
alone). Kept (blocks up to 32 MB from the heap, up to 256 MB of free heap not given back), the
detector alone touched 1.1 MB of new memory per frame and took 28.8 ms a frame instead of 33.2
(one CPU thread). A worker that Ray reuses for other tasks keeps no more than those 256 MB free
(the actors declare their peak to Ray anyway). No effect where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools

# mallopt parameter numbers (malloc.h) and the values: blocks up to 32 MB (glibc's largest mmap
# threshold) from the heap, at most 256 MB of free heap kept (beyond it the top is given back: a
# worker that Ray reuses for other tasks keeps no more), 64 MB of headroom each time the heap grows
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = ((_M_MMAP_THRESHOLD, 32 * 1024**2), (_M_TRIM_THRESHOLD, 256 * 1024**2), (_M_TOP_PAD, 64 * 1024**2))


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse in this process, once; False where the C
    library is not glibc (nothing changes there)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc's where it is the C library
    except (OSError, AttributeError):
        return False
    done = [mallopt(param, value) == 1 for param, value in _KEEP]  # each one, whether or not another fails
    return all(done)
