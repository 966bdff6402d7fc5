"""Where the computation runs and in what precision: the device, and whether bf16 autocast pays.

bf16 is decided by measurement, not assumed: some CPUs (AVX512-BF16/AMX) run bf16 matmuls
several times faster than float32, others (AVX2 only) emulate it and run them far slower.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext

import torch

from deltatune.errors import UserError


def pick_device() -> torch.device:
    """The device a single process computes on: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)
def _bf16_faster_on_cpu() -> bool:
    """Measure, don't assume: CPUs without native bf16 run bf16 matmuls 100x slower, not faster."""
    def seconds(dtype):
        a = torch.randn(256, 256, dtype=dtype)
        a @ a
        start = time.perf_counter()
        for _ in range(3):
            a @ a
        return time.perf_counter() - start
    return seconds(torch.bfloat16) < seconds(torch.float32)


def resolve_bf16(setting, device: torch.device) -> bool:
    """Decide bf16 autocast from the config value and what the hardware does."""
    if setting is False:
        return False
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = _bf16_faster_on_cpu()
    if setting is True and not supported:
        raise UserError(f"bf16: true, but this {device.type} has no fast bfloat16 support "
                        "(set bf16: auto or false)")
    return supported


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()
