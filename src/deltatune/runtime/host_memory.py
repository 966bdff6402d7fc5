"""Host (CPU) memory hygiene on Linux: what PyTorch frees, the process should stop holding.

Two kinds of *resident* memory that no tensor accounts for, both measured on the embedded
SmolLM2-135M (benchmarks/RESULTS.md):

- **glibc keeps freed activations.** A training forward pass allocates each block's
  temporaries (a few MB each) and, between them, small allocations that live until backward
  (saved inputs, autograd nodes). When the temporaries are freed, glibc keeps their pages:
  it gives memory back only from the top of its heap, and the long-lived small chunks pin
  it. One checkpointed LoRA forward grew the process by ~0.4 GB that `malloc_trim` then
  returned at once. `heap_trimmed_between_blocks` trims before a block's forward and before
  its backward whenever the process grew by more than `TRIM_AFTER_GROWTH` bytes since the last
  trim (config `cpu_heap_trim`). The price is time: a returned page is faulted in again when
  reused.
- **Pages of a memory-mapped weight file stay resident after the weights were copied.**
  Reading a safetensors-mapped weight faults its pages into the process; they stay counted
  until the whole mapping goes. `page_out` asks the kernel to drop them (MADV_PAGEOUT): a
  hint that never changes contents: a page that was written, or anonymous memory, stays (or
  at most goes to swap, where there is one).

Elsewhere (another libc, another OS) both are no-ops: the config refuses `cpu_heap_trim`
where glibc's `malloc_trim` does not exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys

import torch

TRIM_AFTER_GROWTH = 32 << 20  # bytes of RSS growth between trims: a few blocks' temporaries
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


def heap_trim_available() -> bool:
    """True where glibc's malloc_trim exists (Linux with glibc)."""
    libc = _libc()
    return libc is not None and hasattr(libc, "malloc_trim")


def resident_bytes() -> int:
    """The process's resident set now (Linux), or 0 where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def trim_heap() -> None:
    """Hand the free pages inside glibc's heap back to the OS."""
    if heap_trim_available():
        _libc().malloc_trim(0)


class _GrowthTrimmer:
    """Trims when the process grew by more than TRIM_AFTER_GROWTH since the last trim: cheap
    when nothing was freed (one read of /proc/self/statm), and bounded when much was."""

    def __init__(self):
        self.baseline = resident_bytes()

    def maybe_trim(self, *_unused) -> None:  # as a hook it returns None: changes nothing
        if resident_bytes() - self.baseline > TRIM_AFTER_GROWTH:
            trim_heap()
            self.baseline = resident_bytes()

    def before_block_backward(self, _module, _inputs, output) -> None:
        """Forward hook: have the block's backward start with a trim too (a hook on the
        gradient of its output, which arrives just before the block's own backward)."""
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self.maybe_trim)


@contextlib.contextmanager
def heap_trimmed_between_blocks(blocks: torch.nn.ModuleList | None):
    """While inside, trim glibc's heap (when it grew) before each block's forward and before
    its backward; once more on the way out, so that evaluation and the delta report start from
    what training really holds. `blocks` None: nothing happens."""
    if blocks is None:
        yield
        return
    trimmer = _GrowthTrimmer()
    handles = [block.register_forward_pre_hook(trimmer.maybe_trim) for block in blocks]
    handles += [block.register_forward_hook(trimmer.before_block_backward) for block in blocks]
    try:
        yield trimmer
    finally:
        for handle in handles:
            handle.remove()
        trim_heap()


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
