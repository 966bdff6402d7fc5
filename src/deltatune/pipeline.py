"""The whole job on one screen: load → data → evaluate base → fit → evaluate tuned → save → report.

Everything that can fail on bad input (config, model, data) runs before the output folder is
created, so a mistake leaves nothing half-written on disk.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltatune import delta_classify, distributed, lowp
from deltatune.checkpoint import find_resume_checkpoint, restore_run_files
from deltatune.config import RunConfig, dump_config
from deltatune.classify import (build_classification_examples, classification_loss, evaluate_classifier,
                                label_names, load_classifier, save_labels_if_adapter, summary_lines)
from deltatune.data import DatasetStats, Example, build_text_blocks, split_records
from deltatune.datacache import cached_sft_examples
from deltatune.delta_report import after_training, check_inputs
from deltatune.errors import UserError
from deltatune.evaluate import evaluate, load_check
from deltatune.formats import CHAT_FORMATS, Record, load_records
from deltatune.methods import apply_method, check_method_available, quantization_config, trainable_summary
from deltatune.model import load_causal_lm, save_pretrained_atomic
from deltatune.report import print_comparison, write_summary
from deltatune.train import FitResult, MetricsLog, causal_lm_loss, fit, resolve_bf16

TASK_FORMATS = {"sft": CHAT_FORMATS, "text": ("text",), "classification": ("classification",)}
PEFT_TASK_TYPES = {"sft": "CAUSAL_LM", "text": "CAUSAL_LM", "classification": "SEQ_CLS"}


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
    test_examples: list[Example] = field(default_factory=list)  # classification: scored test records


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
    if fmt not in TASK_FORMATS[cfg.task]:
        raise UserError(f"{cfg.train_file}: format '{fmt}' does not fit task '{cfg.task}', which needs "
                        f"one of {', '.join(TASK_FORMATS[cfg.task])} (set task: or format:)")
    if cfg.test_file and cfg.task == "text":
        raise UserError(f"test_file: task 'text' is scored by validation loss and perplexity "
                        f"(give {cfg.test_file} as validation_file instead)")
    if cfg.validation_file:
        train, val = records, load_records(cfg.validation_file, fmt)[0]
    else:
        train, val = split_records(records, cfg.validation_split, cfg.seed)
    test = load_records(cfg.test_file, fmt)[0] if cfg.test_file else []
    return Splits(train, val, test)


def load_for_task(cfg: RunConfig, splits: Splits):
    """(model, tokenizer): a causal LM, or a classifier whose new head is sized to the training labels."""
    opts = dict(allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code,
                quantization_config=quantization_config(cfg.method))
    if cfg.task == "classification":
        return load_classifier(cfg.model, label_names(splits.train), seed=cfg.seed, **opts)
    return load_causal_lm(cfg.model, **opts)


def example_builder(cfg: RunConfig, tokenizer, model):
    """records -> (examples, stats) for this task."""
    if cfg.task == "text":
        return functools.partial(build_text_blocks, tokenizer=tokenizer, max_seq_length=cfg.max_seq_length)
    if cfg.task == "classification":
        return functools.partial(build_classification_examples, tokenizer=tokenizer,
                                 max_seq_length=cfg.max_seq_length, label2id=model.config.label2id)
    return functools.partial(cached_sft_examples, tokenizer=tokenizer, max_seq_length=cfg.max_seq_length,
                             train_on_inputs=cfg.train_on_inputs)


def tokenize_splits(splits: Splits, cfg: RunConfig, tokenizer, model=None) -> Datasets:
    build = example_builder(cfg, tokenizer, model)
    train, train_stats = build(splits.train, name=str(cfg.train_file))
    stats = {"train": train_stats}
    val: list[Example] = []
    if splits.val:
        val, stats["validation"] = build(splits.val, name="validation data")
    test_examples = build(splits.test, name=str(cfg.test_file))[0] if cfg.task == "classification" and splits.test else []
    for split, s in stats.items():
        if s.truncated or s.dropped_no_labels:
            print(f"{split}: {s.truncated} examples truncated at max_seq_length={cfg.max_seq_length}, "
                  f"{s.dropped_no_labels} dropped with no trained tokens left", flush=True)
    return Datasets(train, val, splits.test, stats, test_examples)


def prepare_output_dir(cfg: RunConfig, resuming: bool = False) -> Path:
    """`resuming`: find_resume_checkpoint has checked that a non-empty output_dir is this run's."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file (choose a folder path)")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir and not resuming:
        raise UserError(f"output_dir '{out}' is not empty (choose a new folder, set overwrite_output_dir: true, "
                        "or pass --resume to continue the run that is there)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return out


def _evaluate(model, tokenizer, data: Datasets, cfg: RunConfig, device, bf16) -> dict:
    if cfg.task == "classification":
        # Scored on the test file when there is one, else on the held-out validation data.
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return evaluate_classifier(model, loss_examples=data.val, metric_examples=data.test_examples or data.val,
                                   labels=labels, batch_size=cfg.per_device_eval_batch_size,
                                   pad_id=tokenizer.pad_token_id, device=device, bf16=bf16)
    check = load_check(cfg.metric, cfg.metric_pattern, cfg.metric_schema)
    return evaluate(model, tokenizer, loss_examples=data.val, metric_records=data.test, metric=cfg.metric,
                    batch_size=cfg.per_device_eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                    device=device, bf16=bf16, check=check, keep_predictions=max(8, len(data.test)),
                    max_tokens=cfg.max_tokens_per_batch)  # all: the delta report pairs them


def run(cfg: RunConfig) -> RunResult:
    device = distributed.init(cfg.ddp_timeout)  # under torchrun: this rank's device; else pick_device()
    splits = read_splits(cfg)
    check_inputs(cfg)
    load_check(cfg.metric, cfg.metric_pattern, cfg.metric_schema)  # a broken regex or schema fails before training
    check_method_available(cfg.method, device)
    resume = find_resume_checkpoint(cfg, distributed.world_size())  # None: start at step 0
    distributed.barrier()  # every rank has read output_dir before rank 0 rewrites config.yaml and tidies it
    model, tokenizer = load_for_task(cfg, splits)
    data = tokenize_splits(splits, cfg, tokenizer, model)
    bf16 = resolve_bf16(cfg.bf16, device)
    torch.manual_seed(cfg.seed)  # new weights (LoRA, a classifier head) start the same on every rank
    model = apply_method(model, cfg, PEFT_TASK_TYPES[cfg.task])
    trained = trainable_summary(model)
    print(f"method: {cfg.method}", *trained.lines(), sep="\n", flush=True)
    out = (prepare_output_dir(cfg, resuming=cfg.resume_from_checkpoint is not None) if distributed.is_main()
           else Path(cfg.output_dir))  # rank 0 writes
    resumed_step = restore_run_files(out, resume) if cfg.resume_from_checkpoint is not None and distributed.is_main() else 0
    model = distributed.wrap_model(model, cfg.parallelism, device, cfg.fsdp_cpu_offload)  # one process: .to(device)

    with torch.no_grad():  # every rank evaluates (FSDP needs all of them for each forward)
        before = distributed.call(model, _evaluate, tokenizer, data, cfg, device, bf16)
    log = MetricsLog(out, purge_step=resumed_step + 1 if resume else None) if distributed.is_main() else distributed.NullLog()
    try:
        if resume is None:
            log.write({"step": 0, "event": "method", "method": cfg.method, **trained.as_record()})
            log.write({"step": 0, "event": "base_eval", **{k: v for k, v in before.items() if k != "predictions"}})
        loss_fn = classification_loss if cfg.task == "classification" else causal_lm_loss
        lowp.store_frozen_weights(model, cfg.frozen_weights_dtype)  # after the base evaluation: it saw float32
        result = fit(model, tokenizer, data.train, data.val, cfg, out, log, device, loss_fn=loss_fn, resume=resume)
        lowp.restore_frozen_weights(model, lambda: load_for_task(cfg, splits)[0])  # bit for bit, before evaluating
        with torch.no_grad():
            after = distributed.call(model, _evaluate, tokenizer, data, cfg, device, bf16)
        log.write({"step": result.steps, "event": "tuned_eval", **{k: v for k, v in after.items() if k != "predictions"}})
    finally:
        log.close()

    if not distributed.all_finite(model):
        raise UserError("training produced non-finite weights; final/ was not written "
                        "(lower learning_rate, check the data)")
    if not math.isfinite(result.train_loss):
        raise UserError("training loss is not finite; final/ was not written (lower learning_rate, check the data)")
    distributed.save_model(model, tokenizer, out / "final")
    if not distributed.is_main():
        return RunResult(out, before, after, result)
    model = distributed.unwrap(model)
    if cfg.task == "classification":
        save_labels_if_adapter(model, out / "final")
    write_summary(out, model=cfg.model, before=before, after=after, fit=result, data_stats=data.stats,
                  extra=["", "## Method", "", f"- method: {cfg.method}", *(f"- {line}" for line in trained.lines()),
                         *summary_lines(before, after)])
    print_comparison(before, after)
    print(f"tuned model: {out / 'final'}\nsummary: {out / 'summary.md'}")
    if not cfg.delta_report:
        return RunResult(out, before, after, result)
    if distributed.world_size() > 1:
        # The other ranks have left; rank 0 measures alone, on final/ loaded as a plain model
        # (FSDP's weights are shards, and no rank must wait on another for the report's length).
        opts = dict(allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
        model = (load_classifier(str(out / "final"), None, **opts) if cfg.task == "classification"
                 else load_causal_lm(str(out / "final"), **opts))[0]
        model.to(device).eval()
    if cfg.task == "classification":  # accuracy/macro-F1 gain, backbone drift, weight change
        delta_classify.after_training(
            cfg, model, tokenizer, val_examples=data.val, metric_examples=data.test_examples or data.val,
            metric_records=splits.test or splits.val, evaluated_on="test file" if data.test_examples else "validation data",
            before=before, fit=result, out_dir=out, device=device)
    else:  # next-token distributions: task gain, forgetting, weight change
        after_training(cfg, model, tokenizer, data.val, before, after, result, out, device)
    return RunResult(out, before, after, result)
