"""Where one fine-tuning step's time goes, on the embedded SmolLM2-135M.

    python benchmarks/profile_step.py [--steps 3] [--batch-size 4] [--no-packing] [--checkpointing]
                                      [--row-tokens N] [--in-backward] [--method full|lora]

Manual timers around the phases of deltatune's step (the same calls fit() makes): decoder
forward, output head + cross-entropy (chunked, gradients in forward), backward through the
decoder, gradient clipping, AdamW (fused) and zero_grad. The first step is a warm-up and is
not counted. Prints the mean seconds per phase, its share, and the process's peak RSS. With
`--in-backward` AdamW runs inside backward (optimizer_in_backward), so its time is in that phase.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", default=str(HERE / "data"))
    parser.add_argument("--no-packing", dest="packing", action="store_false")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--method", default="full", help="full or lora (r=16, all linear layers)")
    parser.add_argument("--row-tokens", type=int, default=None, help="packed row length (default packing.ROW_TOKENS)")
    parser.add_argument("--in-backward", action="store_true", help="AdamW inside backward (optimizer_in_backward)")
    args = parser.parse_args()

    import torch

    from deltatune.config import build_config
    from deltatune.data.batching import (
        ROW_TOKENS,
        collate,
        collate_packed,
        micro_batches,
        model_mask,
        packed_micro_batches,
        step_groups,
    )
    from deltatune.data.examples import IGNORE_INDEX, build_sft_examples
    from deltatune.data.formats import load_records
    from deltatune.evaluate.loss import linear_cross_entropy
    from deltatune.model.load import load_causal_lm
    from deltatune.model.methods import apply_method
    from deltatune.train.optim import build_optimizer, optimizer_steps_in_backward

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.data) / "train.jsonl").is_file():
        raise SystemExit(f"no {args.data}/train.jsonl: run benchmarks/make_data.py first")
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    records, _ = load_records(Path(args.data) / "train.jsonl", "auto")
    train, _ = build_sft_examples(records, tokenizer, max_seq_length=1024)
    cfg = build_config(dict(train_file="x", learning_rate=5e-5, gradient_checkpointing=args.checkpointing,
                            method=args.method), "p")
    model = apply_method(model, cfg.model)
    if args.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer(model, cfg.train, cfg.memory.optimizer_state_dtype, cfg.seed, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    in_backward = optimizer_steps_in_backward(optimizer, args.in_backward).__enter__()  # hooks for the whole process
    groups = step_groups(len(train), args.batch_size, seed=0, epoch=0)
    phases: dict[str, list[float]] = {}
    tokens, micro = [], []

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        phases.setdefault(name, []).append(time.perf_counter() - start)
        return out

    for step in range(args.steps + 1):
        group = groups[step]
        if args.packing:
            batches = [collate_packed([[train[i] for i in row] for row in mb], tokenizer.pad_token_id)
                       for mb in packed_micro_batches(group, train, args.batch_size, args.row_tokens or ROW_TOKENS)]
        else:
            batches = [collate([train[i] for i in mb], tokenizer.pad_token_id)
                       for mb in micro_batches(group, train, args.batch_size)]
        n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        for k, b in enumerate(batches):
            if in_backward and k == len(batches) - 1:
                in_backward.arm(True)
            extra = {}
            mask = b["attention_mask"]
            if "position_ids" in b:
                mask, extra = model_mask(model, mask, torch.float32), {"position_ids": b["position_ids"]}
            # timed() calls each lambda at once, inside this iteration: the defaults only pin the names
            out = timed("decoder forward",
                        lambda b=b, mask=mask, extra=extra: model.get_decoder()(input_ids=b["input_ids"],
                                                                                attention_mask=mask,
                                                                                use_cache=False, **extra))
            keep = b["labels"][:, 1:] != IGNORE_INDEX
            hidden = out.last_hidden_state[:, :-1][keep]
            loss = timed("head + cross-entropy (fwd+grads)",
                         lambda hidden=hidden, b=b, keep=keep: linear_cross_entropy(hidden, model.lm_head.weight,
                                                                                    b["labels"][:, 1:][keep]))
            timed("backward (decoder + embedding)", lambda loss=loss, n_labels=n_labels: (loss / n_labels).backward())
        if in_backward:
            timed("AdamW after backward (first step only)", in_backward.finish)
        else:
            timed("clip grad norm", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
            timed("AdamW step (fused)", optimizer.step)
        timed("zero_grad(set_to_none)", lambda: optimizer.zero_grad(set_to_none=True))
        if step == 0:  # warm-up step: discard
            phases.clear()
            continue
        tokens.append(sum(len(train[i].input_ids) for i in group))
        micro.append(len(batches))
    per_step = {k: sum(v) / args.steps for k, v in phases.items()}
    total = sum(per_step.values())
    print(f"{args.steps} steps of {args.batch_size} examples ({statistics.mean(tokens):.0f} real tokens/step), "
          f"method={args.method}, packing={args.packing}, checkpointing={args.checkpointing}, "
          f"in_backward={args.in_backward}, "
          f"row_tokens={args.row_tokens or ROW_TOKENS}, {statistics.mean(micro):.2f} micro-batches/step, "
          f"threads={torch.get_num_threads()}")
    for name, seconds in per_step.items():
        print(f"  {name:36s} {seconds:7.3f} s  {seconds / total:6.1%}")
    print(f"  {'total':36s} {total:7.3f} s  -> {statistics.mean(tokens) / total:.0f} real tokens/s")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
