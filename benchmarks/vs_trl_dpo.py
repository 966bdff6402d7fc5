"""deltatune's preference task vs TRL's DPOTrainer on the same DPO job, run side by side as separate processes.

    python benchmarks/vs_trl_dpo.py                          # 3 pairs: TRL, deltatune, TRL, deltatune, ...
    python benchmarks/vs_trl_dpo.py --pairs 1 --steps 50 --json dpo.json
    python benchmarks/vs_trl_dpo.py --only trl --pairs 1 --steps 2 --validation-pairs 8   # smoke-test one side

Same model (embedded SmolLM2-135M-Instruct, float32), same seeded preference pairs
(deltatune.demo.preferences, written to a temp folder), same DPO loss (sigmoid) and beta, learning
rate, linear schedule without warm-up, 8 pairs an optimizer step (no accumulation), max_steps,
seed, LoRA (r 16, alpha 32, dropout 0, every linear layer of the blocks: q/k/v/o/gate/up/down
proj), max length 192 tokens. Both sides use the base model with the adapter disabled as the
reference. TRL keeps its default gradient checkpointing unless `--trl-no-checkpointing`.

Per run: seconds per optimizer step (training steps only: model loading, data preparation and
evaluation excluded), the process's peak RSS (whole process, measured the same way for both
sides: the kernel's rusage of the child, os.wait4), final training loss (mean of the last 5
logged steps), and the held-out reward accuracy after training (TRL: `trainer.evaluate()` on the
validation pairs, `eval_rewards/accuracies`; deltatune: the `tuned_eval` record of metrics.jsonl).
Medians over the pairs, the ratios deltatune/TRL, and whether the targets hold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

MODEL = "smollm2-135m-instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAST_STEPS = 5  # final training loss: the mean of this many last logged steps
TARGETS = {"loss_diff": 0.02, "accuracy_diff": 0.02, "speedup": 1.5, "peak_ratio": 0.8}


# --- the TRL run (a worker process of this script) ------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from deltatune.model.load import load_causal_lm

    model, tokenizer = load_causal_lm(MODEL)
    data = Path(args.data)
    train = Dataset.from_list(read_jsonl(data / "train.jsonl"))
    validation = Dataset.from_list(read_jsonl(data / "validation.jsonl"))
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    out = tempfile.mkdtemp(prefix="bench-trl-dpo-")
    config = DPOConfig(output_dir=out, loss_type=["sigmoid"], beta=args.beta, learning_rate=args.learning_rate,
                       lr_scheduler_type="linear", warmup_steps=0, max_steps=args.steps,
                       per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
                       gradient_accumulation_steps=1, max_grad_norm=1.0, weight_decay=0.0, seed=args.seed,
                       bf16=False, gradient_checkpointing=not args.trl_no_checkpointing,
                       max_length=args.max_length, logging_steps=1, save_strategy="no", eval_strategy="no",
                       report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                       use_cpu=not torch.cuda.is_available())

    steps: list[dict] = []

    class Timer(TrainerCallback):  # wall time of the optimizer steps only, and each step's logged numbers
        def on_train_begin(self, args_, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            self.elapsed = time.perf_counter() - self.started

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "rewards/accuracies" in logs:
                steps.append({"step": state.global_step, "loss": logs["loss"],
                              "reward_accuracy": logs["rewards/accuracies"], "reward_margin": logs["rewards/margins"],
                              "logp_chosen": logs["logps/chosen"], "logp_rejected": logs["logps/rejected"],
                              "elapsed_seconds": self.elapsed})

    trainer = DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    train_peak = peak_rss_gb()
    held_out = trainer.evaluate(validation) if len(validation) else {}
    return dict(steps=steps, train_seconds=steps[-1]["elapsed_seconds"], train_peak_rss_gb=train_peak,
                eval_loss=held_out.get("eval_loss", float("nan")),
                eval_accuracy=held_out.get("eval_rewards/accuracies", float("nan")),
                eval_margin=held_out.get("eval_rewards/margins", float("nan")))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def worker(args) -> None:
    result = run_trl(args)
    Path(args.result).write_text(json.dumps(result))


# --- the deltatune run (its own CLI) --------------------------------------------------------------

def deltatune_config(args, data: Path, out: Path) -> dict:
    return {"model": MODEL, "task": "preference", "method": "lora", "lora_r": args.lora_r, "loss_type": "dpo",
            "beta": args.beta, "train_file": str(data / "train.jsonl"),
            "validation_file": str(data / "validation.jsonl"), "output_dir": str(out),
            "max_seq_length": args.max_length, "learning_rate": args.learning_rate, "max_steps": args.steps,
            "per_device_train_batch_size": args.batch_size, "warmup_ratio": 0, "lr_scheduler_type": "linear",
            "logging_steps": 1, "seed": args.seed, "delta_report": False, "report_to": "none", "bf16": False,
            "side_by_side_prompts": 0,  # TRL's evaluate() generates nothing either
            **{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.deltatune_set)}}


def read_deltatune(out: Path) -> dict:
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if "event" not in r and "loss" in r]
    tuned = next((r for r in records if r.get("event") == "tuned_eval"), {})
    return dict(steps=steps, train_seconds=steps[-1]["elapsed_seconds"], eval_loss=tuned.get("loss", float("nan")),
                eval_accuracy=tuned.get("reward_accuracy", float("nan")),
                eval_margin=tuned.get("reward_margin", float("nan")))


# --- the comparison -------------------------------------------------------------------------------

def run_child(cmd: list[str], log: Path, env: dict) -> tuple[int, float]:
    """Run `cmd` (output to `log`); (exit status, the child's own peak RSS in GB, from its rusage)."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return proc.returncode, usage.ru_maxrss / 1e6  # KiB on Linux


def launch(side: str, args, data: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-dpo-{side}-"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent / "src")}
    if side == "trl":
        cmd = [sys.executable, __file__, "--worker", "--result", str(work / "result.json"), "--data", str(data),
               "--steps", str(args.steps), "--learning-rate", str(args.learning_rate), "--beta", str(args.beta),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--lora-r", str(args.lora_r), "--seed", str(args.seed)]
        if args.trl_no_checkpointing:
            cmd.append("--trl-no-checkpointing")
    else:
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump(deltatune_config(args, data, work / "run"), sort_keys=False))
        cmd = [sys.executable, "-m", "deltatune", "train", str(config)]
    print(f"  running {side} ...", flush=True)
    rc, peak = run_child(cmd, work / "output.log", env)
    if rc != 0:
        tail = (work / "output.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{side} failed (exit {rc}; log {work / 'output.log'}):\n{tail}")
    result = json.loads((work / "result.json").read_text()) if side == "trl" else read_deltatune(work / "run")
    result["peak_rss_gb"] = peak
    steps = result["steps"]
    result["seconds_per_step"] = result["train_seconds"] / steps[-1]["step"]
    result["final_loss"] = statistics.mean(s["loss"] for s in steps[-LAST_STEPS:])
    print(f"    {result['seconds_per_step']:.2f} s/step over {steps[-1]['step']} steps, peak RSS "
          f"{peak:.2f} GB, final loss {result['final_loss']:.4f} (mean of the last {min(LAST_STEPS, len(steps))}), "
          f"held-out reward accuracy {result['eval_accuracy']:.3f}, margin {result['eval_margin']:.3f} "
          f"(work folder {work})", flush=True)
    return result


def summarise(runs: list[dict]) -> dict:
    keys = ("seconds_per_step", "peak_rss_gb", "final_loss", "eval_accuracy", "eval_margin", "eval_loss")
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="TRL/deltatune run pairs, alternating")
    parser.add_argument("--only", choices=["trl", "deltatune"], help="run one side only (no ratios)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (max_steps) per run")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=192, help="tokens of prompt + answer")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation-pairs", type=int, default=32, help="held-out pairs to score (fewer = faster)")
    parser.add_argument("--trl-no-checkpointing", action="store_true", help="turn TRL's gradient checkpointing off")
    parser.add_argument("--deltatune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a deltatune config key for its side (e.g. max_tokens_per_batch=512); repeatable")
    parser.add_argument("--json", help="also write every run's numbers here")
    # worker mode (the TRL side, one process)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from deltatune.demo.orders import write_splits
    from deltatune.demo.preferences import generate

    data = Path(tempfile.mkdtemp(prefix="bench-dpo-data-"))
    splits = generate(args.seed)
    splits["validation"] = splits["validation"][:args.validation_pairs]
    write_splits(data, splits)
    import torch
    import transformers
    import trl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{torch.get_num_threads()} threads; {len(splits['train'])} training pairs, {len(splits['validation'])} "
          f"held out, in {data}; {args.steps} steps of {args.batch_size} pairs, lr {args.learning_rate:g}, "
          f"beta {args.beta:g}; TRL gradient checkpointing {'off' if args.trl_no_checkpointing else 'on'}",
          flush=True)
    sides = [args.only] if args.only else ["trl", "deltatune"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _pair in range(args.pairs):  # A B A B: each side once per pair, in turn
        for side in sides:
            runs[side].append(launch(side, args, data))

    s = {side: summarise(r) for side, r in runs.items()}
    print()
    print("| runner | s/step (training) | peak RSS GB | final train loss | held-out reward accuracy | "
          "held-out margin |")
    print("|---|---|---|---|---|---|")
    for side, m in s.items():
        print(f"| {side} | {m['seconds_per_step']:.2f} | {m['peak_rss_gb']:.2f} | {m['final_loss']:.4f} | "
              f"{m['eval_accuracy']:.3f} | {m['eval_margin']:.3f} |")
    verdict = {}
    if len(s) == 2:
        ours, theirs = s["deltatune"], s["trl"]
        speedup = theirs["seconds_per_step"] / ours["seconds_per_step"]
        peak_ratio = ours["peak_rss_gb"] / theirs["peak_rss_gb"]
        loss_diff = ours["final_loss"] - theirs["final_loss"]
        accuracy_diff = ours["eval_accuracy"] - theirs["eval_accuracy"]
        verdict = {"speedup": speedup, "peak_ratio": peak_ratio, "loss_diff": loss_diff,
                   "accuracy_diff": accuracy_diff,
                   "holds": {"loss_diff": abs(loss_diff) <= TARGETS["loss_diff"],
                             "accuracy_diff": abs(accuracy_diff) <= TARGETS["accuracy_diff"],
                             "speedup": speedup >= TARGETS["speedup"],
                             "peak_ratio": peak_ratio <= TARGETS["peak_ratio"]}}
        holds = verdict["holds"]

        def mark(ok: bool) -> str:
            return "holds" if ok else "MISSED"

        print(f"\ndeltatune/TRL: time per step {1 / speedup:.2f}x (speed-up {speedup:.2f}x, target >= "
              f"{TARGETS['speedup']}x: {mark(holds['speedup'])}); peak RSS {peak_ratio:.2f}x (target <= "
              f"{TARGETS['peak_ratio']}x: {mark(holds['peak_ratio'])}); final loss {loss_diff:+.4f} (target |diff| "
              f"<= {TARGETS['loss_diff']}: {mark(holds['loss_diff'])}); held-out reward accuracy "
              f"{accuracy_diff:+.3f} (target |diff| <= {TARGETS['accuracy_diff']}: {mark(holds['accuracy_diff'])})")
    print(f"\n{args.pairs} run(s) per side, medians. s/step: the training steps' wall time over their number "
          "(loading, data preparation and evaluation excluded). Peak RSS: the whole process's peak (model "
          f"loading and evaluation included), from its rusage. Final train loss: the mean of the last {LAST_STEPS} "
          "logged steps.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "medians": s, "verdict": verdict},
                                              indent=1))


if __name__ == "__main__":
    main()
