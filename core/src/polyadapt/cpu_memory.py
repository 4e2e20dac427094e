"""Peak resident memory of CPU training under glibc's ``malloc``.

glibc serves blocks below its mmap threshold from a heap and keeps freed heap memory resident; the threshold starts at
128 KiB and raises itself (up to 32 MiB) each time a larger mmapped block is freed. A training step frees and
reallocates activations of slightly different sizes every step (batches of different lengths), so after a few steps
those activations come from a heap that fragments and holds far more than the step uses. A fixed threshold stops the
raising: every block at or above it is mmapped and handed back to the system when freed.

``train.cpu_mmap_threshold_kib`` (default null: glibc's behaviour) fixes it when a run trains on a CPU. It trades
time for memory: every large activation is then fresh, zeroed pages (on SmolLM2-135M's shape, 1024 KiB brought peak
RSS from 1.19x to 0.77x the HF Trainer's at about half the throughput; see the README). It is process-wide and stays
for the rest of the process (glibc cannot go back to raising it itself).
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def is_glibc() -> bool:
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def fix_mmap_threshold(size: int, trim: int | None = None) -> bool:
    """Fix glibc's mmap threshold at ``size`` bytes (and its trim threshold at ``trim`` bytes when given). False where
    this is not glibc or glibc refuses the value."""
    if not is_glibc():
        return False
    libc = ctypes.CDLL(None)
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, int(size)))
    if trim is not None:
        done = bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim))) and done
    return done
