"""Model size on CPU: random-init Llama-shape models (135M, 360M, 1B) saved in bfloat16, trained a few steps
by `deltatune train`, with the weights kept as stored (`torch_dtype: auto`) or loaded as float32.

    python benchmarks/scale.py                                     # every size x lora, full x auto, float32
    python benchmarks/scale.py --sizes 135m,1b --methods lora      # a subset
    python benchmarks/scale.py --json scale.json --models /tmp/m   # keep the built models (and reuse them)

Each model is built from its config (no download) with seeded random weights, in bfloat16, and saved
with SmolLM2's tokenizer (the embedded one). Each run is its own child process (`python -m deltatune
train`): a few seeded conversations, `max_steps` steps of batch 2, max_seq_length 128, no validation,
no delta report unless --delta. Printed per run: peak RSS (the child's own, from the kernel: os.wait4;
and sampled every 50 ms, split at the delta report's first line into training's and the report's),
what `deltatune plan` predicted for the same config, tokens/s of the last logged step (metrics.jsonl),
wall time (start to exit) and when the model was ready (the `method:` line), the losses, the
report's time by measure, and the weight bytes the checkpoint holds. GB are 10^9 bytes throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {  # Llama-family shapes: SmolLM2-135M, SmolLM2-360M, Llama-3.2-1B
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


def build_model(size: str, folder: Path, tokenizer_dir: Path | None = None) -> float:
    """A seeded random-init model of the shape, saved in bfloat16 with SmolLM2's tokenizer (the embedded model's,
    or the one in `tokenizer_dir`); seconds taken."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    if tokenizer_dir is None:
        sys.path.insert(0, str(HERE.parent / "src"))
        from deltatune.model.load import resolve

        tokenizer_dir = resolve("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**SHAPES[size], max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: no float32 copy of a 1B model
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return time.perf_counter() - start


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def conversations(path: Path, n: int = 64, words_per_turn: int = 12) -> None:
    words = "apple river stone cloud lamp paper garden silver window music bridge forest".split()
    with path.open("w") as fh:
        for i in range(n):
            picked = [words[(i * 7 + k * 3) % len(words)] for k in range(words_per_turn)]
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": "Repeat these words in order: " + " ".join(picked)},
                {"role": "assistant", "content": " ".join(picked)}]}) + "\n")


REPORT_MARK = "measuring what fine-tuning changed"  # the delta report's first line: training's peak is before it


def watch(proc, stdout_path: Path) -> dict:
    """Sample the child's RSS every 50 ms and copy its stdout, noting when the model was ready and when the delta
    report began: {peak before the report, peak of the report, seconds to the first step, to the report}."""
    marks, lines = {}, []
    start = time.perf_counter()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("method:"):
                marks.setdefault("loaded_s", time.perf_counter() - start)
            if REPORT_MARK in line:
                marks.setdefault("report_s", time.perf_counter() - start)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    train_peak = report_peak = 0
    while proc.poll() is None:
        try:
            rss = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError):
            break
        if "report_s" in marks:
            report_peak = max(report_peak, rss)
        else:
            train_peak = max(train_peak, rss)
        time.sleep(0.05)
    reader.join(timeout=5)
    stdout_path.write_text("".join(lines))
    return {**marks, "train_peak_gb": train_peak / 1e9, "report_peak_gb": report_peak / 1e9}


def planned_peak(config: Path, env: dict) -> float | None:
    """What `deltatune plan` predicts for the same config (its last line: `peak: N.N GB`)."""
    proc = subprocess.run([sys.executable, "-m", "deltatune", "plan", str(config)], env=env, capture_output=True,
                          text=True)
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    return float(last[0].split()[1]) if proc.returncode == 0 and last[0].startswith("peak:") else None


def run(model: Path, method: str, dtype: str, data: Path, work: Path, steps: int, timeout: float,
        delta: bool) -> dict:
    import yaml

    out = work / f"{model.name}-{method}-{dtype}"
    config = {"model": str(model), "method": method, "torch_dtype": dtype, "train_file": str(data),
              "validation_split": 0.1 if delta else 0, "max_steps": steps, "per_device_train_batch_size": 2,
              "max_seq_length": 128, "learning_rate": 1e-4, "logging_steps": 1, "delta_report": delta,
              "metric": "none", "report_to": "none", "bf16": False, "output_dir": str(out),
              "overwrite_output_dir": True}
    (work / f"{out.name}.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "DELTATUNE_PROGRESS": "1"}
    planned = planned_peak(work / f"{out.name}.yaml", env)
    start = time.perf_counter()
    with open(work / f"{out.name}.err", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "deltatune", "train", str(work / f"{out.name}.yaml")],
                                env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        seen = watch(proc, work / f"{out.name}.out")
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, from the kernel
        timer.cancel()
    rc = os.waitstatus_to_exitcode(status)
    result = {"model": model.name, "method": method, "torch_dtype": dtype, "rc": rc,
              "wall_s": time.perf_counter() - start, "peak_gb": usage.ru_maxrss * 1024 / 1e9,
              "planned_gb": planned, **seen}
    metrics = out / "metrics.jsonl"
    if rc != 0 or not metrics.is_file():
        result["error"] = ((work / f"{out.name}.err").read_text().strip().splitlines() or ["?"])[-1]
        return result
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    start_row = next(r for r in rows if r.get("event") == "start")
    steps_rows = [r for r in rows if "loss" in r and "event" not in r]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    result.update(resolved=saved["torch_dtype"], trainable=start_row["trainable_parameters"],
                  parameters=start_row["total_parameters"], losses=[r["loss"] for r in steps_rows],
                  tokens_per_second=steps_rows[-1]["tokens_per_second"] if steps_rows else None)
    if delta and (out / "delta.json").is_file():
        seconds = json.loads((out / "delta.json").read_text())["seconds"]
        result.update(report_seconds=seconds, train_s=result.get("report_s", 0) - result.get("loaded_s", 0))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,360m,1b")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--dtypes", default="auto,float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", help="folder for the built models (default: a temp folder; reused if there)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--delta", action="store_true",
                        help="with the delta report (and a tenth of the records held out for validation)")
    parser.add_argument("--json", help="also write every number here")
    args = parser.parse_args()
    import torch
    import transformers

    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()
                    if f.startswith(("avx", "amx"))}) if Path("/proc/cpuinfo").exists() else []
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{os.cpu_count()} cores, CPU flags: {' '.join(flags)}", flush=True)
    models = Path(args.models or tempfile.mkdtemp(prefix="scale-models-"))
    models.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scale-runs-"))
    data = work / "train.jsonl"
    conversations(data)
    results = []
    for size in args.sizes.split(","):
        folder = models / f"llama-{size}-bf16"
        if not folder.is_dir():
            print(f"building {size} ...", flush=True)
            print(f"  built in {build_model(size, folder):.1f} s", flush=True)
        for method in args.methods.split(","):
            for dtype in args.dtypes.split(","):
                r = run(folder, method, dtype, data, work, args.steps, args.timeout, args.delta)
                r.update(size=size, weight_gb=weight_bytes(folder) / 1e9)
                results.append(r)
                report = (f", report {r['report_seconds']['total']:.0f} s peak {r['report_peak_gb']:.2f} GB "
                          f"({', '.join(f'{k} {v:.0f}' for k, v in r['report_seconds'].items() if k != 'total')})"
                          if "report_seconds" in r else "")
                print(f"  {size} {method} {dtype} -> {r.get('resolved', '?')}: rc {r['rc']}, {r['wall_s']:.1f} s "
                      f"(model ready {r.get('loaded_s', 0):.0f} s), peak RSS {r['peak_gb']:.2f} GB "
                      f"(training {r['train_peak_gb']:.2f}), planned {r['planned_gb']} GB, weights "
                      f"{r['weight_gb']:.2f} GB, {r.get('tokens_per_second') or 0:.0f} tok/s, "
                      f"losses {r.get('losses')}{report}" + (f", error: {r['error']}" if "error" in r else ""),
                      flush=True)
                shutil.rmtree(work / f"{folder.name}-{method}-{dtype}", ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
