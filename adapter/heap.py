"""The memory a replay decides its partitions in, kept from one partition to the next.

A partition's resources, parsed, take ~10x its input in memory, all let go once it is decided.
Left to themselves, CPython's small-object allocator gives an arena (1 MiB) back to the OS the
moment its last object is freed, and glibc's malloc gives back the top of its heap once 128 KiB
of it is free; the next partition then takes the same memory back from the kernel a page at a
time, each page a fault. `keep(n)` holds on to the memory instead: the process stays at about
the size its largest partition takes it to anyway, and the partitions after the first take few
pages from the kernel. Measured on a 10k-encounter replay (compiled, one worker, a virtual
machine, where a fault is dear): ~51k page faults and 0.29-0.42 s of system time before, ~31k
and ~0.20 s with `keep` (of ~4 s of CPU in all); peak RSS 88 MB before, 91 MB with it.

It relies on how the allocators behave, not on what they promise: where one differs (another
libc, another Python), `keep` changes nothing but the speed.
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Final

__all__ = ["keep"]

# glibc's mallopt parameter (malloc.h), and its default.
_M_TRIM_THRESHOLD: Final = -1
_TRIM_THRESHOLD_DEFAULT: Final = 128 << 10
# Small objects fill the reserve: bytes objects of 512 bytes with their header, the largest
# CPython's allocator serves from its arenas (1 MiB each, from 3.10 on).
_FILLER_SLOT: Final = 512
_FILLER_BYTES: Final = _FILLER_SLOT - 40
# One object kept in every 128 KiB of them: several in each arena.
_STRIDE: Final = (128 << 10) // _FILLER_SLOT

_kept: list[bytes] = []
_kept_bytes = 0


def keep(nbytes: int) -> None:
    """Keep `nbytes` of small-object arenas, and the top of malloc's heap, from going back to
    the OS between partitions (a larger `nbytes` later keeps the rest; processes forked after
    keep it too)."""
    global _kept_bytes
    if nbytes <= _kept_bytes:
        return
    _tune_malloc(nbytes)
    # Allocated one after the other, they fill each new arena in address order: every
    # `_STRIDE`th of them, kept, keeps each arena in use; the rest, freed, leave their pools free
    # for any object to use.
    filler = list(map(bytes, itertools.repeat(_FILLER_BYTES, (nbytes - _kept_bytes) // _FILLER_SLOT)))
    _kept.extend(filler[::_STRIDE])
    del filler
    _kept_bytes = nbytes


def _tune_malloc(nbytes: int) -> None:
    """glibc's malloc keeps a freed heap top of up to `nbytes`. (Its blocks of their own mmap,
    the large ones, are left to it: serving them from the heap added ~8 MB to a replay's peak for
    a third of the faults saved.)"""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_TRIM_THRESHOLD, max(nbytes, _TRIM_THRESHOLD_DEFAULT))
