"""Peak memory of LoRA training with the frozen base weights stored in float32, float16 or bfloat16
(config key `frozen_weights_dtype`), with and without gradient checkpointing.

    python benchmarks/frozen_dtype.py                   # 6 steps each, SmolLM2-135M, LoRA r=16
    python benchmarks/frozen_dtype.py --steps 10 --dtypes float32,float16
    python benchmarks/frozen_dtype.py --ab 5            # speed only: steps alternated in one process

Each setting runs in its own process, so its peak RSS (VmHWM) is its own. Per run: peak RSS
after loading, after training and after restoring the float32 weights; seconds per training
step (noisy on a shared machine: note it, don't trust it); and the validation loss of the
trained model, scored as the pipeline scores it, on the restored float32 base weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

MODEL = "smollm2-135m-instruct"


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB -> GB
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args) -> dict:
    import tempfile

    import torch

    from deltatune.config import build_config
    from deltatune.data.examples import build_sft_examples
    from deltatune.data.formats import load_records
    from deltatune.evaluate.loss import mean_loss
    from deltatune.model.load import load_causal_lm
    from deltatune.model.methods import apply_method
    from deltatune.pipeline import fit_run
    from deltatune.train import frozen_weights as lowp
    from deltatune.train.loop import fit
    from deltatune.train.metrics_log import MetricsLog

    model, tokenizer = load_causal_lm(MODEL)
    train, _ = build_sft_examples(load_records(Path(args.data) / "train.jsonl", "auto")[0], tokenizer,
                                  max_seq_length=args.max_seq_length)
    val, _ = build_sft_examples(load_records(Path(args.data) / "validation.jsonl", "auto")[0], tokenizer,
                                max_seq_length=args.max_seq_length)
    out = Path(tempfile.mkdtemp(prefix="bench-frozen-dtype-"))
    cfg = build_config(dict(train_file="unused", output_dir=str(out), learning_rate=args.learning_rate,
                            method="lora", lora_r=args.lora_r, lora_dropout=0.0, max_steps=args.steps,
                            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                            warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0,
                            seed=args.seed, logging_steps=10**6, max_seq_length=args.max_seq_length,
                            gradient_checkpointing=args.checkpointing, frozen_weights_dtype=args.dtype), "bench")
    torch.manual_seed(args.seed)  # LoRA's A starts random: the same start for every setting, as pipeline.run does
    model = apply_method(model, cfg.model)
    loaded = peak_rss_gb()
    lowp.store_frozen_weights(model, cfg.memory.frozen_weights_dtype)
    log = MetricsLog(out)
    start = time.perf_counter()
    result = fit(model, tokenizer, train, [], cfg.train, cfg.memory, fit_run(cfg, out, log, torch.device("cpu")))
    wall = time.perf_counter() - start
    log.close()
    trained = peak_rss_gb()
    lowp.restore_frozen_weights(model, lambda: load_causal_lm(MODEL)[0])
    restored = peak_rss_gb()
    val_loss, _ = mean_loss(model, val, 8, tokenizer.pad_token_id, torch.device("cpu"))
    return dict(dtype=args.dtype, checkpointing=args.checkpointing, peak_after_load=loaded,
                peak_after_fit=trained, peak_after_restore=restored, seconds_per_step=wall / result.steps,
                tokens_per_second=result.tokens_per_second, val_loss=val_loss)


def speed_ab(args) -> None:
    """Seconds per training step (forward + backward of the same 4 examples), float32 storage and
    each other dtype alternated in one process: a machine's changing load hits both sides alike."""
    import statistics

    import torch

    from deltatune.config import build_config
    from deltatune.data.batching import collate_packed, packed_micro_batches
    from deltatune.data.examples import build_sft_examples
    from deltatune.data.formats import load_records
    from deltatune.evaluate.loss import causal_lm_loss
    from deltatune.model.load import load_causal_lm
    from deltatune.model.methods import apply_method
    from deltatune.train import frozen_weights as lowp
    from deltatune.train.loop import accumulate_gradients

    model, tokenizer = load_causal_lm(MODEL)
    train, _ = build_sft_examples(load_records(Path(args.data) / "train.jsonl", "auto")[0], tokenizer,
                                  max_seq_length=args.max_seq_length)
    model = apply_method(model, build_config({"train_file": "unused", "method": "lora", "lora_r": args.lora_r},
                                             "bench").model).train()
    group = list(range(args.batch_size))
    batches = [collate_packed([[train[i] for i in row] for row in mb], tokenizer.pad_token_id)
               for mb in packed_micro_batches(group, train, args.batch_size)]
    times: dict[str, list[float]] = {}
    dtypes = args.dtypes.split(",")
    for _ in range(args.ab + 1):  # the first round warms up and is not counted
        for dtype in dtypes:
            lowp.store_frozen_weights(model, dtype)
            start = time.perf_counter()
            accumulate_gradients(model, batches, causal_lm_loss, torch.device("cpu"), False)
            times.setdefault(dtype, []).append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            lowp.restore_frozen_weights(model, lambda: load_causal_lm(MODEL)[0])
    for dtype in dtypes:
        print(f"{dtype:>9}: {statistics.median(times[dtype][1:]):.2f} s per forward+backward of {args.batch_size} "
              f"examples (median of {args.ab}; runs {', '.join(f'{t:.2f}' for t in times[dtype][1:])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--checkpointing", default="off,on", help="gradient_checkpointing settings to run: off,on")
    parser.add_argument("--data", default="/tmp/bench80")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing-on", dest="checkpoint_flag", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ab", type=int, default=0,
                        help="instead: time one training step N times per dtype, alternated in one process")
    args = parser.parse_args()
    if args.ab:
        return speed_ab(args)
    if args.worker:
        args.checkpointing = args.checkpoint_flag
        print(json.dumps(worker(args)))
        return

    if not (Path(args.data) / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(HERE / "make_data.py"), "--out", args.data, "--train", "80",
                        "--validation", "24", "--seed", str(args.seed)], check=True)
    rows = []
    for checkpointing in args.checkpointing.split(","):
        for dtype in args.dtypes.split(","):
            cmd = [sys.executable, __file__, "--worker", "--dtype", dtype, "--data", args.data,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--learning-rate", str(args.learning_rate), "--lora-r", str(args.lora_r),
                   "--max-seq-length", str(args.max_seq_length), "--seed", str(args.seed),
                   *(["--checkpointing-on"] if checkpointing == "on" else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{dtype:>9} checkpointing {checkpointing:>3}: peak RSS {r['peak_after_fit']:.2f} GB "
                  f"(after load {r['peak_after_load']:.2f}, after restore {r['peak_after_restore']:.2f}), "
                  f"{r['seconds_per_step']:.1f} s/step, val loss {r['val_loss']:.4f}", flush=True)
    print(f"\n{args.steps} LoRA r={args.lora_r} steps of {args.batch_size} examples, SmolLM2-135M, "
          f"lr {args.learning_rate}\n")
    print("| frozen_weights_dtype | gradient_checkpointing | peak RSS (GB) | s/step | val loss after |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | {r['peak_after_fit']:.2f} | "
              f"{r['seconds_per_step']:.1f} | {r['val_loss']:.4f} |")


if __name__ == "__main__":
    main()
