"""Measured matmul peak of this machine (GFLOP/s) in float32 and bfloat16, for MFU figures.

    python benchmarks/peak_flops.py [--size 1024] [--seconds 2] [--json]

The best of several timed repeats of an n x n @ n x n matmul on all torch threads. Another
process sharing the CPU lowers it: run on an idle machine for a clean number.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def matmul_gflops(dtype: torch.dtype, size: int, seconds: float, device: str = "cpu") -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up (and kernel selection)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * size ** 3 / best / 1e9


def measure(size: int = 1024, seconds: float = 2.0, device: str = "cpu") -> dict:
    # bf16 gets a smaller matrix where it is emulated (100x slower): the rate does not depend on size there.
    fp32 = matmul_gflops(torch.float32, size, seconds, device)
    bf16_small = matmul_gflops(torch.bfloat16, 256, 0.2, device)
    bf16 = matmul_gflops(torch.bfloat16, size, seconds, device) if bf16_small > fp32 / 10 else bf16_small
    return {"device": device, "threads": torch.get_num_threads(), "size": size,
            "float32_gflops": round(fp32, 1), "bfloat16_gflops": round(bf16, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = measure(args.size, args.seconds, args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['device']}, {result['threads']} threads: float32 {result['float32_gflops']} GFLOP/s, "
              f"bfloat16 {result['bfloat16_gflops']} GFLOP/s (matmul {args.size}x{args.size})")


if __name__ == "__main__":
    main()
