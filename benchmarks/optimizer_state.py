"""Does storing AdamW's moments in bfloat16 (config `optimizer_state_dtype`) change where full
fine-tuning ends? Trains SmolLM2-135M twice from the same start, same data order, once per
dtype, and prints the validation loss after each epoch and how far apart the final weights are.

    python benchmarks/optimizer_state.py --data /tmp/bench80 --epochs 5

The distance is relative to how far training moved the weights: ||θ_bf16 - θ_fp32|| / ||θ_fp32 - θ_base||
over all parameters (0: identical runs; 1: as far apart as training moved them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE / "data"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from deltatune.config import build_config
    from deltatune.data.examples import build_sft_examples
    from deltatune.data.formats import load_records
    from deltatune.model.load import load_causal_lm
    from deltatune.pipeline import fit_run
    from deltatune.train.loop import fit
    from deltatune.train.metrics_log import MetricsLog

    if not (Path(args.data) / "train.jsonl").is_file():
        raise SystemExit(f"no {args.data}/train.jsonl: run benchmarks/make_data.py first")
    base, tokenizer = load_causal_lm(MODEL)
    base_weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    del base
    train, _ = build_sft_examples(load_records(Path(args.data) / "train.jsonl", "auto")[0], tokenizer,
                                  max_seq_length=1024)
    val, _ = build_sft_examples(load_records(Path(args.data) / "validation.jsonl", "auto")[0], tokenizer,
                                max_seq_length=1024)
    finals, curves = {}, {}
    for dtype in ("float32", "bfloat16"):
        model, _ = load_causal_lm(MODEL)
        out = Path(tempfile.mkdtemp(prefix=f"bench-optstate-{dtype}-"))
        cfg = build_config(dict(train_file="unused", output_dir=str(out), learning_rate=args.learning_rate,
                                method="full", num_train_epochs=args.epochs,
                                per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                                warmup_ratio=0.1, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.01,
                                seed=args.seed, logging_steps=10**6, optimizer_state_dtype=dtype), "bench")
        log = MetricsLog(out)
        start = time.perf_counter()
        result = fit(model, tokenizer, train, val, cfg.train, cfg.memory, fit_run(cfg, out, log, torch.device("cpu")))
        log.close()
        curves[dtype] = [r["eval_loss"] for r in result.history if "eval_loss" in r]
        finals[dtype] = {n: p.detach().clone() for n, p in model.named_parameters()}
        print(f"{dtype:9s} moments: {result.steps} steps in {time.perf_counter() - start:.0f} s; validation loss "
              f"by epoch {', '.join(f'{x:.4f}' for x in curves[dtype])}", flush=True)
        del model

    def norm(diffs):
        return sum(float(d.double().square().sum()) for d in diffs) ** 0.5
    apart = norm(finals["bfloat16"][n] - finals["float32"][n] for n in base_weights)
    moved = norm(finals["float32"][n] - base_weights[n] for n in base_weights)
    last32, last16 = curves["float32"][-1], curves["bfloat16"][-1]
    print(f"final validation loss {last32:.4f} (float32) vs {last16:.4f} (bfloat16), "
          f"{(last16 - last32) / last32:+.2%}; weights apart / moved by training: {apart / moved:.4f}")


if __name__ == "__main__":
    main()
