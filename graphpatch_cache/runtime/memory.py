"""Opt-in: keep memory the process frees for reuse instead of handing it back to the OS.

Recording many activations keeps every one of them alive until the call returns, so each
recorded call holds far more memory at its peak than the plain model (which frees each
intermediate as soon as the next op has read it). When the recorded tensors are dropped,
glibc's ``malloc`` returns the freed pages to the kernel (``munmap`` of large blocks, and
trimming of the heap's top), and the next recorded call takes them back one page fault at a
time, each page zeroed by the kernel. On GPT-2 (12 x 768, 128 tokens, a probe on each of
1,019 nodes) that refaulting is most of the recording overhead.

:func:`keep_freed_memory` sets glibc's thresholds so freed memory stays in the process for
the next call. It is process-wide and never done implicitly: the process's resident memory
then stays near its peak. The same settings without code: run Python with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment,
or preload another allocator (jemalloc, tcmalloc) that keeps freed pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from typing import Optional

from ..errors import AllocatorError

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
#: never trim the heap's top (the largest value mallopt takes)
NEVER_TRIM = 2 ** 31 - 1


@dataclass(frozen=True)
class AllocatorSettings:
    """What :func:`keep_freed_memory` set: glibc's version and the two thresholds, in bytes."""

    glibc: str
    mmap_threshold: int
    trim_threshold: int


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    return libc


def keep_freed_memory(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = NEVER_TRIM) -> AllocatorSettings:
    """Keep freed memory in this process for reuse (glibc only; process-wide; see the module doc).

    Blocks smaller than ``mmap_threshold`` come from the heap and stay there when freed; the
    heap's top is given back only above ``trim_threshold``. Setting either also stops glibc
    from adjusting its thresholds as blocks are freed. Raises :class:`AllocatorError` where
    the C library is not glibc: set the allocator up outside Python there (jemalloc's
    ``LD_PRELOAD``, or nothing: the calls are correct either way, only slower).
    """
    if not (0 < mmap_threshold <= MAX_MMAP_THRESHOLD):
        raise ValueError(f"mmap_threshold must be in 1..{MAX_MMAP_THRESHOLD} bytes, got {mmap_threshold}")
    if not (0 < trim_threshold <= NEVER_TRIM):
        raise ValueError(f"trim_threshold must be in 1..{NEVER_TRIM} bytes, got {trim_threshold}")
    libc = _glibc()
    if libc is None:
        raise AllocatorError(
            "keep_freed_memory needs glibc's mallopt, which this process's C library does not have",
            hint="preload an allocator that keeps freed pages instead (e.g. LD_PRELOAD=libjemalloc.so.2)")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    version = libc.gnu_get_libc_version().decode()
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    for option, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)):
        if libc.mallopt(option, value) != 1:
            raise AllocatorError(f"glibc {version} refused mallopt({option}, {value})",
                                 hint="pass thresholds glibc accepts, or leave the allocator as it is")
    return AllocatorSettings(glibc=version, mmap_threshold=mmap_threshold, trim_threshold=trim_threshold)
