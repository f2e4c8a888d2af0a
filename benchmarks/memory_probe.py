"""Peak resident memory of one call, for the benchmarks (Linux with glibc; NaN elsewhere).

Around the call glibc is told to serve every block of 128 KiB or more with its own mapping and to return it
on free, so each temporary shows up in the peak (VmHWM, reset through /proc/self/clear_refs) instead of
reusing memory that earlier calls left resident. Afterwards the thresholds go back to glibc's usual steady
state (32 MiB / 64 MiB), so that timings taken between probes are not slowed by page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.mallopt, _libc.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _libc = None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def peak_extra_mib(fn) -> float:
    """MiB of the peak resident size during fn() above the resident size before it."""
    if _libc is None:
        return float("nan")
    _libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
    _libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)
    _libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) / 1024
    except OSError:
        return float("nan")
    finally:
        _libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        _libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
