"""Host (CPU) memory on Linux: pages of a memory-mapped weight file that no tensor reads any more.

Reading a safetensors-mapped weight faults its pages into the process, and they stay counted
as resident until the whole mapping goes, even after the weight was copied elsewhere (as
`keep_frozen_stored` does when it upcasts a weight to float32). `page_out` asks the kernel to
drop them (MADV_PAGEOUT): a hint that never changes contents, so a page that was written, or
anonymous memory, stays (or at most goes to swap, where there is one). Elsewhere (another OS,
no libc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

_MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL and nothing happens
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.lru_cache(maxsize=None)
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    if hasattr(libc, "madvise"):
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def page_out(tensors) -> None:
    """Ask the kernel to drop the resident pages of these tensors' memory, whole pages only.
    For pages read from a mapped file and never written (safetensors weights) that lowers
    RSS, and a later read faults them in again from the file. Written or anonymous pages
    stay (or at most go to swap): contents never change. Call it on memory no tensor will
    read soon."""
    libc = _libc()
    if not sys.platform.startswith("linux") or libc is None or not hasattr(libc, "madvise"):
        return  # the advice number is Linux's
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # pages wholly inside
        if last > first:
            libc.madvise(first, last - first, _MADV_PAGEOUT)


def trim_heap() -> None:
    """Hand the C heap's free memory back to the kernel (glibc's malloc_trim), once, between stages: what training
    freed (its gradients and optimizer state) then stops counting as resident before the next stage allocates.
    Elsewhere (no glibc) it does nothing."""
    libc = _libc()
    if sys.platform.startswith("linux") and libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
