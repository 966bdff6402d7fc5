"""deltatune vs TRL's SFTTrainer on the same job, run side by side as separate processes.

    python benchmarks/vs_trl.py                      # full FT and LoRA, 3 pairs, TRL fp32 defaults + fastest
    python benchmarks/vs_trl.py --pairs 1 --methods full --trl defaults,fastest,defaults-fp32,fastest-fp32
    python benchmarks/vs_trl.py --ours packed,lean     # also deltatune's least-memory settings (LEAN below)

Same model (embedded SmolLM2-135M-Instruct), same seeded data (benchmarks/make_data.py), same
examples per optimizer step, learning rate, schedule, epochs and seed. Each run is its own
process (so peak RSS is its own), and runs alternate A B A B. Per run: wall time of the
training epoch(s) (model loading and evaluation excluded), real (non-padding) tokens/s,
trained (label) tokens/s, peak RSS when training ends (model loading included; the ratios use
it) and at exit (after scoring), final validation loss (the same function scores both sides'
models on the same held-out split), and MFU against the measured float32 matmul peak.

TRL settings: `defaults` = its CPU defaults (bf16 autocast, gradient checkpointing on),
`fastest` = bf16, checkpointing off; the `-fp32` variants turn bf16 off (on CPUs without
native bf16, bf16 autocast is far slower than float32; the default list is the fp32 pair
there). A bf16 run on such a CPU would take hours, so `--max-steps-bf16` times that many steps
and extrapolates the epoch (marked `*`; no validation loss).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

MODEL = "smollm2-135m-instruct"
OUR_SETTINGS = {  # name -> deltatune config keys (the first one listed in --ours is the reference)
    "packed": {}, "unpacked": {"packing": False},
    "checkpointing": {"gradient_checkpointing": True}, "compile": {"torch_compile": True},
}
LEAN = {  # `--ours lean`: deltatune's least-memory settings for the method, clipping kept
    # AdamW's moments stored in bfloat16 (stochastic rounding), computed in float32. Sessions 4-5
    # also trimmed glibc's heap between blocks (`cpu_heap_trim`, since removed), so their lean
    # peaks in RESULTS.md are lower than these settings give.
    "full": {"optimizer_state_dtype": "bfloat16"},
    # The frozen weights loaded and kept in float16 (torch_dtype), computed in float32; checkpointing on.
    "lora": {"torch_dtype": "float16", "gradient_checkpointing": True},
}
TRL_SETTINGS = {  # name -> (bf16, gradient_checkpointing)
    "defaults": (True, True), "fastest": (True, False),
    "defaults-fp32": (False, True), "fastest-fp32": (False, False),
}


# --- one run (a worker process) -----------------------------------------------------------------

def load_data(args):
    from deltatune.data.examples import build_sft_examples
    from deltatune.data.formats import load_records
    from deltatune.model.load import load_causal_lm

    model, tokenizer = load_causal_lm(MODEL)
    train_records, _ = load_records(Path(args.data) / "train.jsonl", "auto")
    val_records, _ = load_records(Path(args.data) / "validation.jsonl", "auto")
    val, _ = build_sft_examples(val_records, tokenizer, max_seq_length=args.max_seq_length)
    return model, tokenizer, train_records, val


def run_deltatune(args) -> dict:
    import torch

    from deltatune.config import build_config
    from deltatune.data.examples import build_sft_examples
    from deltatune.evaluate.loss import mean_loss
    from deltatune.model.load import load_causal_lm
    from deltatune.model.methods import apply_method
    from deltatune.pipeline import fit_run
    from deltatune.train.loop import fit
    from deltatune.train.metrics_log import MetricsLog

    model, tokenizer, train_records, val = load_data(args)
    ours = LEAN[args.method] if args.setting == "lean" else OUR_SETTINGS[args.setting]
    if ours.get("torch_dtype", "float32") != "float32":  # loaded as the run would load it
        model = load_causal_lm(MODEL, dtype=ours["torch_dtype"])[0]
    train, _ = build_sft_examples(train_records, tokenizer, max_seq_length=args.max_seq_length)
    out = Path(tempfile.mkdtemp(prefix="bench-deltatune-"))
    settings = dict(train_file="unused", output_dir=str(out), learning_rate=args.learning_rate,
                    method=args.method, lora_r=args.lora_r, lora_dropout=0.0,
                    num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
                    gradient_accumulation_steps=1, warmup_steps=0, lr_scheduler_type="linear",
                    max_grad_norm=1.0, weight_decay=0.0, seed=args.seed, logging_steps=10**6,
                    max_seq_length=args.max_seq_length)
    cfg = build_config({**settings, **ours}, "bench")
    model = apply_method(model, cfg.model)  # LoRA: r, alpha 2r, all linear layers of the blocks, like TRL's below
    log = MetricsLog(out)
    start = time.perf_counter()
    fit(model, tokenizer, train, [], cfg.train, cfg.memory, fit_run(cfg, out, log, torch.device("cpu")))
    wall = time.perf_counter() - start
    train_peak = peak_rss_gb()
    log.close()
    val_loss, _ = mean_loss(model, val, 8, tokenizer.pad_token_id, torch.device("cpu"))
    real = sum(len(e.input_ids) for e in train) * args.epochs
    trained = sum(sum(label != -100 for label in e.labels[1:]) for e in train) * args.epochs
    return dict(wall=wall, real_tokens=real, trained_tokens=trained, val_loss=val_loss, extrapolated=False,
                train_peak_rss_gb=train_peak)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from deltatune.evaluate.loss import mean_loss

    bf16, checkpointing = TRL_SETTINGS[args.setting]
    model, tokenizer, train_records, val = load_data(args)
    # Conversational prompt-completion: TRL then trains the completion only, as deltatune does.
    rows = [{"prompt": r.messages[:-1], "completion": r.messages[-1:]} for r in train_records]
    peft_config = None
    if args.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    out = tempfile.mkdtemp(prefix="bench-trl-")
    steps_per_epoch = math.ceil(len(rows) / args.batch_size)
    max_steps = args.max_steps_bf16 if bf16 and args.max_steps_bf16 > 0 else -1
    config = SFTConfig(output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                       learning_rate=args.learning_rate, num_train_epochs=args.epochs, max_steps=max_steps,
                       lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                       seed=args.seed, bf16=bf16, gradient_checkpointing=checkpointing,
                       max_length=args.max_seq_length, logging_steps=10**6, save_strategy="no",
                       eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                       use_cpu=not torch.cuda.is_available())  # without it, bf16 on a CPU-only machine is refused
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    train_peak = peak_rss_gb()
    data = trainer.train_dataset
    real = sum(len(ids) for ids in data["input_ids"]) * args.epochs
    if "completion_mask" in data.column_names:
        trained = sum(sum(m[1:]) for m in data["completion_mask"]) * args.epochs
    else:
        trained = sum(sum(label != -100 for label in lab[1:]) for lab in data["labels"]) * args.epochs
    extrapolated = max_steps > 0 and max_steps < steps_per_epoch * args.epochs
    if extrapolated:  # timed a few steps only: scale to the whole run
        wall *= steps_per_epoch * args.epochs / max_steps
    val_loss = float("nan") if extrapolated else mean_loss(trainer.model, val, 8, tokenizer.pad_token_id,
                                                           torch.device("cpu"))[0]
    return dict(wall=wall, real_tokens=real, trained_tokens=trained, val_loss=val_loss, extrapolated=extrapolated,
                train_peak_rss_gb=train_peak)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def worker(args) -> None:
    import torch

    torch.manual_seed(args.seed)
    result = run_deltatune(args) if args.side == "deltatune" else run_trl(args)
    result["peak_rss_gb"] = peak_rss_gb()  # with the scoring, which reloads float32 weights after float16 storage
    Path(args.result).write_text(json.dumps(result))


# --- the comparison -----------------------------------------------------------------------------

def model_flops_per_token(method: str) -> tuple[float, float]:
    """(per real token, per trained token) model FLOPs: 6N (full) or 4N (LoRA: no weight grads)
    for the non-embedding weights, and the same factor for the output head at label positions."""
    from transformers import AutoConfig

    from deltatune.model.load import resolve

    c = AutoConfig.from_pretrained(resolve(MODEL))
    per_layer = 4 * c.hidden_size * c.hidden_size * (1 + c.num_key_value_heads / c.num_attention_heads) / 2 \
        + 3 * c.hidden_size * c.intermediate_size
    factor = 6 if method == "full" else 4
    return factor * per_layer * c.num_hidden_layers, factor * c.hidden_size * c.vocab_size


def launch(side: str, setting: str, method: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--worker", "--side", side, "--setting", setting, "--method", method,
           "--result", result_path, "--data", args.data, "--batch-size", str(args.batch_size),
           "--learning-rate", str(args.learning_rate), "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--max-seq-length", str(args.max_seq_length), "--lora-r", str(args.lora_r),
           "--max-steps-bf16", str(args.max_steps_bf16)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent / "src")}
    print(f"  running {side} {setting} {method} ...", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} {setting} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(Path(result_path).read_text())
    Path(result_path).unlink()
    print(f"    wall {result['wall']:.1f} s, {result['real_tokens'] / result['wall']:.0f} real tok/s, "
          f"peak RSS {result['train_peak_rss_gb']:.2f} GB training ({result['peak_rss_gb']:.2f} with scoring), "
          f"val loss {result['val_loss']:.4f}", flush=True)
    return result


def summarise(runs: list[dict]) -> dict:
    def med(key):
        return statistics.median(r[key] for r in runs)
    return dict(wall=med("wall"), real_tps=statistics.median(r["real_tokens"] / r["wall"] for r in runs),
                trained_tps=statistics.median(r["trained_tokens"] / r["wall"] for r in runs),
                rss=med("train_peak_rss_gb"), rss_scored=med("peak_rss_gb"), val_loss=med("val_loss"),
                real_tokens=runs[0]["real_tokens"],
                trained_tokens=runs[0]["trained_tokens"], extrapolated=runs[0]["extrapolated"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--ours", default="packed",
                        help="deltatune settings, the first is the reference for the ratios: "
                             f"{', '.join(OUR_SETTINGS)}, lean")
    parser.add_argument("--trl", default="defaults-fp32,fastest-fp32",
                        help=f"TRL settings to compare against: {', '.join(TRL_SETTINGS)}")
    parser.add_argument("--data", default=str(HERE / "data"))
    parser.add_argument("--train-examples", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-steps-bf16", type=int, default=2,
                        help="TRL bf16 runs: time this many steps and extrapolate (0 = run them in full)")
    parser.add_argument("--json", help="also write every run's numbers here")
    # worker mode (one side, one process)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["deltatune", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="packed", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if not (Path(args.data) / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(HERE / "make_data.py"), "--out", args.data,
                        "--train", str(args.train_examples), "--seed", str(args.seed)], check=True)
    import torch
    import transformers
    import trl
    from peak_flops import measure

    peak = measure(seconds=1.0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{torch.get_num_threads()} threads; measured matmul peak: float32 {peak['float32_gflops']} GFLOP/s, "
          f"bfloat16 {peak['bfloat16_gflops']} GFLOP/s", flush=True)
    runners = [("deltatune", s) for s in args.ours.split(",") if s] + [("trl", s) for s in args.trl.split(",") if s]
    reference = runners[0]
    all_runs: dict = {}
    for method in args.methods.split(","):
        for _pair in range(args.pairs):  # A B A B: each runner once per pair, in turn
            for side, setting in runners:
                all_runs.setdefault((method, side, setting), []).append(launch(side, setting, method, args))
    print()
    print("| method | runner | epoch wall s | real tok/s | trained tok/s | peak RSS GB training (with scoring) | "
          f"val loss | MFU fp32 | time ratio vs {' '.join(reference)} | RSS ratio {' '.join(reference)}/this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        per_real, per_trained = model_flops_per_token(method)
        ours = summarise(all_runs[(method, *reference)])
        for (m, side, setting), runs in all_runs.items():
            if m != method:
                continue
            s = summarise(runs)
            flops = per_real * s["real_tokens"] + per_trained * s["trained_tokens"]
            mfu = flops / s["wall"] / 1e9 / peak["float32_gflops"]
            star = "*" if s["extrapolated"] else ""
            ratio = f"{s['wall'] / ours['wall']:.2f}x"  # > 1: this runner is slower than the reference
            rss = f"{ours['rss'] / s['rss']:.2f}"
            print(f"| {method} | {side} {setting} | {s['wall']:.1f}{star} | {s['real_tps']:.0f} | "
                  f"{s['trained_tps']:.0f} | "
                  f"{s['rss']:.2f} ({s['rss_scored']:.2f}) | {s['val_loss']:.4f} | {mfu:.1%} | {ratio} | {rss} |")
    print(f"\n{args.pairs} pair(s) per setting, medians; * = extrapolated from {args.max_steps_bf16} timed steps. "
          "MFU: model FLOPs (6N full / 4N LoRA per token, head at label positions only) over the measured "
          "float32 peak. "
          "Peak RSS training: the process's peak when training ends (model loading included); with scoring: at exit, "
          "after the benchmark's own validation pass (the same function for both sides; deltatune's float16 storage "
          "reloads the float32 weights for it).")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak": peak, "runs": {"/".join(k): v for k, v in all_runs.items()}},
                                              indent=1))


if __name__ == "__main__":
    main()
