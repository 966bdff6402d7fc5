"""What differs between the objectives, in one registry of plain functions.

`TASKS[cfg.task]` says, for `sft`, `text`, `classification` and `preference`: which record
formats the task reads, how records become examples, which model class loads, the loss and
what it is a sum over, what must be computed before training, how base and tuned are
evaluated, which delta report ends the run, peft's task type, and whether examples may share
a packed row. The pipeline, the CLI and the sweep ask the registry and never compare
task names themselves. Each entry is a `Task` of plain functions: no subclasses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from deltatune.config import RunConfig
from deltatune.data.cache import cached_sft_examples
from deltatune.data.examples import DatasetStats, Example, build_preference_examples, sft_example_maker
from deltatune.data.formats import CHAT_FORMATS, Record, load_records
from deltatune.data.sources import SourceShare
from deltatune.data.templates import use_template
from deltatune.data.text_examples import build_classification_examples, build_text_blocks, label_names
from deltatune.delta import causal, classifier, preference
from deltatune.delta.measures import CompareSettings, report_options
from deltatune.delta.render import ReportKind
from deltatune.delta.summary import classification_lines
from deltatune.errors import UserError
from deltatune.evaluate.data_files import FileSettings, evaluate_chats, evaluate_labelled, predict_labels
from deltatune.evaluate.evaluate import evaluate, evaluate_classifier
from deltatune.evaluate.loss import LossFn, causal_lm_loss, classification_loss, label_tokens
from deltatune.evaluate.metrics import load_check
from deltatune.evaluate.preference import attach_reference, evaluate_pairs, loss_function, objective_of, pairs_in
from deltatune.model.load import (
    load_causal_lm,
    load_classifier,
    save_labels_if_adapter,
    saved_task_type,
    stop_at_end_of_turn,
    weights_dtype,
)
from deltatune.model.methods import add_token_rows, quantization_config
from deltatune.model.parts import accepts_token_types
from deltatune.runtime.precision import resolve_bf16
from deltatune.train.checkpoint import data_fingerprint


@dataclass
class Splits:
    """Validated records, read before any model is loaded so bad data fails fast."""
    train: list[Record]
    val: list[Record]
    test: list[Record]
    mix: list[SourceShare] = field(default_factory=list)  # the sources of a `datasets:` mix
    stream: Callable[[], Iterable[Record]] | None = None  # streaming: one pass over the training records


@dataclass
class Datasets:
    train: list[Example]
    val: list[Example]
    test: list[Record]
    stats: dict[str, DatasetStats]
    test_examples: list[Example] = field(default_factory=list)  # classification: the scored test records
    val_records: list[Record] = field(default_factory=list)
    mix: list[dict] = field(default_factory=list)  # a `datasets:` mix: each source's draws and token share


@dataclass(frozen=True)
class Task:
    """One objective: every way it differs from the others, as data and plain functions."""

    name: str
    formats: tuple[str, ...]  # record formats it trains on
    peft_task_type: str  # peft's name: CAUSAL_LM, SEQ_CLS
    report: ReportKind  # the delta report kind a run of it writes
    loss: Callable[[RunConfig], LossFn]  # the run's loss function
    load: Callable[[RunConfig, Splits], tuple]  # (model, tokenizer) to train
    load_tuned: Callable[..., tuple]  # (folder, allow_pickle=, trust_remote_code=) -> (model, tokenizer)
    example_builder: Callable  # (cfg, tokenizer, model) -> build(records, name=) -> (examples, stats)
    evaluate: Callable  # (model, tokenizer, Datasets, cfg, device, bf16) -> metrics dict
    delta_report: Callable  # (cfg, model, tokenizer, Datasets, before, after, fit, out_dir, device) -> report
    units: Callable[[dict], int] = label_tokens  # what the loss sums over, counted in a batch (tokens, pairs)
    # (cfg, model, tokenizer, Datasets, out_dir, resume, device, bf16): what must exist before the base is evaluated
    before_training: Callable[..., None] = lambda cfg, model, tokenizer, data, out, resume, device, bf16: None
    summary_lines: Callable[[dict, dict], list[str]] = lambda before, after: []  # extra summary.md lines
    save_extras: Callable[[object, Path], None] = lambda model, folder: None  # files beside final/
    own_settings: str | None = None  # a config group no other task reads ("preference")
    compares: bool = True  # `deltatune compare` can score two models on its records
    packs: bool = True  # its examples may share a packed row
    new_head: bool = False  # the model gets a freshly initialised head, trained (and saved with an adapter)
    rows_per_example: int = 1  # model rows an example takes (a preference pair: its chosen and rejected sides)
    test_file_hint: str | None = None  # why it takes no test_file (None: it takes one)
    stream_maker: Callable | None = None  # streaming: (cfg, tokenizer) -> make(records, stats) -> examples
    cached_examples: bool = False  # its examples are cached by content: a warm start need not read its records
    prepares: str | None = None  # what `deltatune prepare` makes of documents for it ("pairs", "labelled")
    evaluate_file: Callable | None = None  # `deltatune eval`: (model, data file, FileSettings) -> result
    predict_file: Callable | None = None  # `deltatune predict`: (model, data, out, FileSettings, overwrite) -> n


def _load_opts(cfg: RunConfig) -> dict:
    return dict(allow_pickle=cfg.model.allow_pickle, trust_remote_code=cfg.model.trust_remote_code,
                quantization_config=quantization_config(cfg.model.method), dtype=weights_dtype(cfg.model))


def _load_causal(cfg: RunConfig, splits: Splits):
    model, tokenizer = load_causal_lm(cfg.model.name, **_load_opts(cfg))
    added = use_template(tokenizer, cfg.model.chat_template, cfg.model.chat_template_kwargs,
                         add_missing=cfg.model.add_special_tokens)
    add_token_rows(model, tokenizer, added)
    stop_at_end_of_turn(model, tokenizer)
    return model, tokenizer


def _load_classifier(cfg: RunConfig, splits: Splits):
    """A classifier whose new head is sized to the training labels."""
    return load_classifier(cfg.model.name, label_names(splits.train), seed=cfg.seed, **_load_opts(cfg))


def _load_tuned_classifier(folder: str, **opts):
    return load_classifier(folder, None, **opts)


def _sft_settings(cfg: RunConfig) -> dict:
    data = cfg.data
    return dict(max_seq_length=data.max_seq_length, train_on_inputs=data.train_on_inputs,
                reasoning_format=data.reasoning_format, train_on_reasoning=data.train_on_reasoning)


def _sft_builder(cfg: RunConfig, tokenizer, model):
    return functools.partial(cached_sft_examples, tokenizer=tokenizer, num_proc=cfg.data.dataset_num_proc,
                             **_sft_settings(cfg))


def _sft_maker(cfg: RunConfig, tokenizer):
    return sft_example_maker(tokenizer, **_sft_settings(cfg))


def _text_builder(cfg: RunConfig, tokenizer, model):
    return functools.partial(build_text_blocks, tokenizer=tokenizer, max_seq_length=cfg.data.max_seq_length)


def _classification_builder(cfg: RunConfig, tokenizer, model):
    return functools.partial(build_classification_examples, tokenizer=tokenizer,
                             max_seq_length=cfg.data.max_seq_length, label2id=model.config.label2id,
                             token_types=accepts_token_types(model))


def _evaluate_causal(model, tokenizer, data: Datasets, cfg: RunConfig, device, bf16) -> dict:
    ev = cfg.eval
    check = load_check(ev.metric, ev.metric_pattern, ev.metric_schema)
    return evaluate(model, tokenizer, loss_examples=data.val, metric_records=data.test, metric=ev.metric,
                    batch_size=ev.per_device_eval_batch_size, max_new_tokens=ev.max_new_tokens,
                    device=device, bf16=bf16, check=check, keep_predictions=max(8, len(data.test)),
                    max_tokens=cfg.memory.max_tokens_per_batch)  # all: the delta report pairs them


def _evaluate_classifier(model, tokenizer, data: Datasets, cfg: RunConfig, device, bf16) -> dict:
    # Scored on the test file when there is one, else on the held-out validation data.
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return evaluate_classifier(model, loss_examples=data.val, metric_examples=data.test_examples or data.val,
                               labels=labels, batch_size=cfg.eval.per_device_eval_batch_size,
                               pad_id=tokenizer.pad_token_id, device=device, bf16=bf16)


def _options(cfg: RunConfig):
    return report_options(cfg.delta, cfg.eval.per_device_eval_batch_size, cfg.seed)


def _causal_report(cfg: RunConfig, model, tokenizer, data: Datasets, before, after, fit, out_dir, device) -> dict:
    """Next-token distributions: task gain, forgetting, weight change."""
    return causal.after_training(cfg.model, _options(cfg), cfg.eval.metric, model, tokenizer, data.val, before,
                                 after, fit, out_dir, device)


def _classifier_report(cfg: RunConfig, model, tokenizer, data: Datasets, before, after, fit, out_dir, device) -> dict:
    """Accuracy/macro-F1 gain, backbone drift, weight change."""
    return classifier.after_training(
        cfg.model, _options(cfg), resolve_bf16(cfg.memory.bf16, device), model, tokenizer, val_examples=data.val,
        metric_examples=data.test_examples or data.val, metric_records=data.test or data.val_records,
        evaluated_on="test file" if data.test_examples else "validation data", before=before, fit=fit,
        out_dir=out_dir, device=device)


def _preference_builder(cfg: RunConfig, tokenizer, model):
    return functools.partial(build_preference_examples, tokenizer=tokenizer, max_seq_length=cfg.data.max_seq_length)


def _objective(cfg: RunConfig):
    return objective_of(cfg.preference, cfg.model.method)


def _reference_before_training(cfg: RunConfig, model, tokenizer, data: Datasets, out: Path, resume, device,
                               bf16) -> None:
    """Full fine-tuning (and every method without adapters to switch off): the base's log-probabilities
    of every pair, computed now, while the model is still the base."""
    splits = {"train": data.train, "validation": data.val} if data.val else {"train": data.train}
    attach_reference(model, splits, _objective(cfg), fingerprint=data_fingerprint(data.train), out_dir=out,
                     reuse=resume is not None, batch_size=cfg.eval.per_device_eval_batch_size,
                     pad_id=tokenizer.pad_token_id, device=device, bf16=bf16,
                     max_tokens=cfg.memory.max_tokens_per_batch)


def _evaluate_preference(model, tokenizer, data: Datasets, cfg: RunConfig, device, bf16) -> dict:
    """Held-out pairs: preference and reward accuracy, margins, the loss; greedy answers to the first prompts."""
    return evaluate_pairs(model, tokenizer, data.val, data.val_records, _objective(cfg),
                          batch_size=cfg.eval.per_device_eval_batch_size, device=device, bf16=bf16,
                          max_tokens=cfg.memory.max_tokens_per_batch, generate_for=cfg.delta.side_by_side_prompts,
                          max_new_tokens=cfg.eval.max_new_tokens)


def _preference_report(cfg: RunConfig, model, tokenizer, data: Datasets, before, after, fit, out_dir, device) -> dict:
    """Preference accuracy gain, KL(reference‖tuned) on held-out responses, forgetting, weight change."""
    return preference.after_training(cfg.model, _options(cfg), _objective(cfg), model, tokenizer, data.val, before,
                                     after, fit, out_dir, device)


_CAUSAL = dict(peft_task_type="CAUSAL_LM", report=causal.KIND, loss=lambda cfg: causal_lm_loss, load=_load_causal,
               load_tuned=load_causal_lm, evaluate=_evaluate_causal, delta_report=_causal_report,
               evaluate_file=evaluate_chats)
TASKS: dict[str, Task] = {
    "sft": Task("sft", CHAT_FORMATS, example_builder=_sft_builder, prepares="pairs",
                cached_examples=True, stream_maker=_sft_maker, **_CAUSAL),
    "text": Task("text", ("text",), example_builder=_text_builder, compares=False,
                 test_file_hint="task 'text' is scored by validation loss and perplexity", **_CAUSAL),
    "classification": Task(
        "classification", ("classification",), peft_task_type="SEQ_CLS", report=classifier.KIND,
        loss=lambda cfg: classification_loss, load=_load_classifier, load_tuned=_load_tuned_classifier,
        example_builder=_classification_builder, evaluate=_evaluate_classifier, delta_report=_classifier_report,
        summary_lines=classification_lines, save_extras=save_labels_if_adapter, packs=False, new_head=True,
        prepares="labelled", evaluate_file=evaluate_labelled, predict_file=predict_labels),
    "preference": Task(
        "preference", ("preference",), peft_task_type="CAUSAL_LM", report=preference.KIND,
        loss=lambda cfg: loss_function(_objective(cfg)), load=_load_causal, load_tuned=load_causal_lm,
        example_builder=_preference_builder, evaluate=_evaluate_preference, delta_report=_preference_report,
        units=pairs_in, before_training=_reference_before_training, own_settings="preference", packs=False,
        rows_per_example=2, test_file_hint="task 'preference' is scored on held-out pairs"),
}


def check_task_settings(cfg: RunConfig) -> None:
    """A key of a group that only another task reads is a mistake, not a setting to ignore silently."""
    if cfg.data.streaming and TASKS[cfg.task].stream_maker is None:
        raise UserError(f"streaming: true works for task sft (task is '{cfg.task}'; set streaming: false)")
    for task in TASKS.values():
        if task.own_settings is None or task is TASKS[cfg.task]:
            continue
        group = getattr(cfg, task.own_settings)
        changed = [k for k, v in group.model_dump().items() if v != type(group).model_fields[k].default]
        if changed:
            raise UserError(f"{', '.join(changed)}: only task '{task.name}' reads this (task is '{cfg.task}'; "
                            f"delete the line or set task: {task.name})")


def report_kind(task_type: str) -> ReportKind:
    """The report kind behind a delta.json's `task_type`."""
    kinds = {task.report.task_type: task.report for task in TASKS.values()}
    if task_type not in kinds:
        raise UserError(f"delta.json: unknown task_type '{task_type}' (known: {', '.join(kinds)})")
    return kinds[task_type]


def task_for_folder(folder: str) -> Task:
    """The task a saved model folder or adapter was trained for (a classifier, or else a causal LM)."""
    saved = saved_task_type(folder)
    return next((t for t in TASKS.values() if t.peft_task_type == saved), TASKS["sft"])


def task_for_format(fmt: str) -> Task:
    """The task whose records a data file holds: conversations, raw text or labelled text."""
    return next(t for t in TASKS.values() if fmt in t.formats)


def compare_models(base: str, tuned: str, data_file: str, out_dir: Path, fmt: str, settings: CompareSettings) -> dict:
    """`deltatune compare`: the delta report of the data's task for any pair of models."""
    records, fmt = load_records(data_file, fmt)
    task = task_for_format(fmt)
    if not task.compares:  # raw text: no prompts to answer, nothing to score
        raise UserError(f"{data_file}: format '{fmt}' has no conversations to compare the models on")
    if task.new_head:  # two classifiers, or a base encoder and a tuned classifier
        if saved_task_type(tuned) != task.peft_task_type:
            raise UserError(f"{tuned}: not a sequence classifier (no *ForSequenceClassification in config.json, "
                            f"no classification adapter); {data_file} holds classification records")
        return task.report.compare(base, tuned, records, data_file, out_dir, settings,
                                   base_has_head=saved_task_type(base) == task.peft_task_type)
    return task.report.compare(base, tuned, records, data_file, out_dir, settings)


def evaluate_file(model: str, data_file: str, settings: FileSettings) -> dict:
    """`deltatune eval`: the tuned model scored on a data file the way its task scores it."""
    return task_for_folder(model).evaluate_file(model, data_file, settings)


def predict_file(model: str, data_file: str, out: Path, settings: FileSettings, overwrite: bool = False) -> int:
    """`deltatune predict`: label a file's records with a classifier."""
    task = task_for_folder(model)
    if task.predict_file is None:
        raise UserError(f"{model}: not a sequence classifier; predict labels text with a classifier "
                        "(for a causal LM use deltatune generate or eval)")
    return task.predict_file(model, data_file, out, settings, overwrite)
