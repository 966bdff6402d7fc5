"""The whole job on one screen: load → data → evaluate base → fit → evaluate tuned → save → report.

Everything that can fail on bad input (config, model, data) runs before the output folder is
created, so a mistake leaves nothing half-written on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.config import RunConfig, dump_config
from deltatune.datacache import cached_sft_examples
from deltatune.data import DatasetStats, Example, build_sft_examples, split_records
from deltatune.errors import UserError
from deltatune.evaluate import evaluate
from deltatune.formats import CHAT_FORMATS, Record, load_records
from deltatune.model import load_causal_lm, save_pretrained_atomic
from deltatune.report import print_comparison, write_summary
from deltatune.train import FitResult, MetricsLog, fit, resolve_bf16


@dataclass
class Splits:
    """Validated records, read before any model is loaded so bad data fails fast."""
    train: list[Record]
    val: list[Record]
    test: list[Record]


@dataclass
class Datasets:
    train: list[Example]
    val: list[Example]
    test: list[Record]
    stats: dict[str, DatasetStats]


@dataclass
class RunResult:
    out_dir: Path
    before: dict
    after: dict
    fit: FitResult


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_splits(cfg: RunConfig) -> Splits:
    records, fmt = load_records(cfg.train_file, cfg.format)
    if fmt not in CHAT_FORMATS:
        raise UserError(f"{cfg.train_file}: format '{fmt}' has no conversations; task 'sft' needs "
                        f"one of {', '.join(CHAT_FORMATS)}")
    if cfg.validation_file:
        train, val = records, load_records(cfg.validation_file, fmt)[0]
    else:
        train, val = split_records(records, cfg.validation_split, cfg.seed)
    test = load_records(cfg.test_file, fmt)[0] if cfg.test_file else []
    return Splits(train, val, test)


def tokenize_splits(splits: Splits, cfg: RunConfig, tokenizer) -> Datasets:
    opts = dict(max_seq_length=cfg.max_seq_length, train_on_inputs=cfg.train_on_inputs)
    train, train_stats = cached_sft_examples(splits.train, tokenizer, name=str(cfg.train_file), **opts)
    stats = {"train": train_stats}
    val: list[Example] = []
    if splits.val:
        val, stats["validation"] = cached_sft_examples(splits.val, tokenizer, name="validation data", **opts)
    for split, s in stats.items():
        if s.truncated or s.dropped_no_labels:
            print(f"{split}: {s.truncated} examples truncated at max_seq_length={cfg.max_seq_length}, "
                  f"{s.dropped_no_labels} dropped with no trained tokens left", flush=True)
    return Datasets(train, val, splits.test, stats)


def prepare_output_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file (choose a folder path)")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir:
        raise UserError(f"output_dir '{out}' is not empty (choose a new folder, or set overwrite_output_dir: true)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return out


def _evaluate(model, tokenizer, data: Datasets, cfg: RunConfig, device, bf16) -> dict:
    return evaluate(model, tokenizer, loss_examples=data.val, metric_records=data.test, metric=cfg.metric,
                    batch_size=cfg.per_device_eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                    device=device, bf16=bf16, keep_predictions=8)


def run(cfg: RunConfig) -> RunResult:
    device = pick_device()
    splits = read_splits(cfg)
    model, tokenizer = load_causal_lm(cfg.model, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    data = tokenize_splits(splits, cfg, tokenizer)
    bf16 = resolve_bf16(cfg.bf16, device)
    out = prepare_output_dir(cfg)
    model.to(device)

    before = _evaluate(model, tokenizer, data, cfg, device, bf16)
    log = MetricsLog(out)
    try:
        log.write({"step": 0, "event": "base_eval", **{k: v for k, v in before.items() if k != "predictions"}})
        result = fit(model, tokenizer, data.train, data.val, cfg, out, log, device)
        after = _evaluate(model, tokenizer, data, cfg, device, bf16)
        log.write({"step": result.steps, "event": "tuned_eval", **{k: v for k, v in after.items() if k != "predictions"}})
    finally:
        log.close()

    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError("training produced non-finite weights; final/ was not written "
                        "(lower learning_rate, check the data)")
    if not math.isfinite(result.train_loss):
        raise UserError("training loss is not finite; final/ was not written (lower learning_rate, check the data)")
    save_pretrained_atomic(model, tokenizer, out / "final")
    write_summary(out, model=cfg.model, before=before, after=after, fit=result, data_stats=data.stats)
    print_comparison(before, after)
    print(f"tuned model: {out / 'final'}\nsummary: {out / 'summary.md'}")
    return RunResult(out, before, after, result)
