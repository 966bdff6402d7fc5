"""The whole job on one screen: preflight → data → model → evaluate base → fit → evaluate tuned → save → report.

Everything that can be refused (the machine, the config's files, a resume) is refused in
`preflight`, and everything that can fail on bad input (config, model, data) runs before the
output folder is created, so a mistake leaves nothing half-written on disk. What differs
between tasks comes from `tasks.TASKS`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deltatune.config import RunConfig, dump_config
from deltatune.data.cache import ExampleTable, cache_dir, tokenizer_digest
from deltatune.data.examples import Example, split_records
from deltatune.data.formats import known_format, load_records, read_raw, stream_records
from deltatune.data.sources import SourceShare, draw_mix, seeded_sample, training_sources
from deltatune.data.split_cache import DeferredRecords, load_reading, reading_key, save_reading
from deltatune.data.stream import SHUFFLE_BUFFER, ExampleStream
from deltatune.data.templates import read_template
from deltatune.delta.benchmarks import check_available as check_benchmarks
from deltatune.delta.measures import check_inputs
from deltatune.delta.render import mix_markdown
from deltatune.delta.summary import print_comparison, write_summary
from deltatune.errors import UserError, where
from deltatune.evaluate.metrics import load_check
from deltatune.files import FolderLock, has_content, lock_folder, writing
from deltatune.model.host_memory import trim_heap
from deltatune.model.load import weights_dtype
from deltatune.model.methods import apply_method, trainable_summary
from deltatune.progress import note, stage
from deltatune.runtime import distributed
from deltatune.runtime.plan import GB, plan_lines, plan_memory, refuse_unless_fits
from deltatune.runtime.precision import pick_device, resolve_bf16
from deltatune.tasks import TASKS, Datasets, Splits, Task, check_task_settings
from deltatune.train.checkpoint import find_resume_checkpoint, restore_run_files
from deltatune.train.loop import FitResult, FitRun, fit
from deltatune.train.metrics_log import MetricsLog, NullLog
from deltatune.train.trackers import check_available as check_trackers
from deltatune.train.trackers import open_trackers


@dataclass
class RunResult:
    out_dir: Path
    before: dict
    after: dict
    fit: FitResult


@dataclass(frozen=True)
class Preflight:
    """What the checks before loading decided: this process's device, whether it computes in bf16,
    the checkpoint to resume (or None), and the output folder's lock, held until the run ends
    (`with preflight(cfg) as checked:`)."""
    device: torch.device
    bf16: bool
    resume: Path | None
    lock: FolderLock | None = None

    def __enter__(self) -> "Preflight":
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def preflight(cfg: RunConfig, force: bool = False) -> Preflight:
    """Every refusal that needs no model: another run in the same output folder, what this machine
    and launch can run, its memory (unless `force`), the cache, the report's and the metric's own
    files, and the resume; before any model is loaded or anything is written."""
    device = distributed.init(cfg.parallel.ddp_timeout)  # under torchrun: this rank's device
    lock = lock_output_dir(cfg)
    try:
        return Preflight(device, *checks_before_loading(cfg, device, force), lock)
    except BaseException:
        if lock is not None:
            lock.release()  # nothing was written: the folder is left as it was found
        raise


def lock_output_dir(cfg: RunConfig) -> FolderLock | None:
    """Rank 0 takes output_dir's lock for the whole run; every rank learns whether it could."""
    lock, refused = None, None
    if distributed.is_main():
        try:
            lock = lock_folder(Path(cfg.output.output_dir))
        except UserError as err:
            refused = err
    if not distributed.all_true(refused is None):
        raise refused or UserError("rank 0 could not take output_dir's lock (its error is printed above)")
    return lock


def check_cache_writable() -> None:
    """Tokenised data and converted models are cached; an unwritable cache is one line, not a traceback later."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"DELTATUNE_CACHE '{folder}': cannot write there ({err.strerror or err}); "
                        "set DELTATUNE_CACHE to a writable folder") from None


def checks_before_loading(cfg: RunConfig, device: torch.device, force: bool = False) -> tuple[bool, Path | None]:
    """(bf16, the checkpoint to resume or None), or the one-line refusal."""
    world = distributed.world_size()
    check_task_settings(cfg)
    if cfg.model.chat_template:
        read_template(cfg.model.chat_template)  # a missing or unreadable template file, before anything loads
    missing = []
    if cfg.model.method == "qlora" and device.type != "cuda":
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if cfg.model.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise UserError(f"method 'qlora' needs {' and '.join(missing)}; use method: lora on this machine")
    if cfg.memory.optimizer_in_backward and world > 1:
        raise UserError("optimizer_in_backward: true works on one process only (DDP and FSDP reduce gradients "
                        "after backward, the in-backward update would use this process's part); turn it off "
                        "under torchrun / --nproc")
    if cfg.parallel.fsdp_cpu_offload and device.type != "cuda":
        raise UserError("fsdp_cpu_offload: true needs CUDA devices (on CPU the shards are in CPU memory already; "
                        "set it to false)")
    bf16 = resolve_bf16(cfg.memory.bf16, device)  # bf16: true where the device has no fast bf16 is refused
    check_memory(cfg, device, bf16, force)
    check_trackers(cfg.output.report_to)
    check_benchmarks(cfg.delta.forgetting_benchmarks, cfg.delta.benchmark_tasks_dir)
    check_cache_writable()
    check_inputs(cfg.delta, cfg.seed)  # a bad probe or corpus file fails in seconds, not after training
    load_check(cfg.eval.metric, cfg.eval.metric_pattern, cfg.eval.metric_schema)  # a broken regex or schema
    resume = find_resume_checkpoint(cfg, world)  # None: start at step 0
    distributed.barrier()  # every rank has read output_dir before rank 0 rewrites config.yaml and tidies it
    return bf16, resume


def check_memory(cfg: RunConfig, device: torch.device, bf16: bool, force: bool) -> None:
    """The memory plan in one line; a run that would not fit its device is refused (on every rank) unless `force`."""
    plan = plan_memory(cfg, TASKS[cfg.task], device, bf16, distributed.world_size())
    if distributed.is_main():
        print(f"memory plan: peak {plan.peak / GB:.1f} GB of {plan.where}"
              + (f" ({plan.total / GB:.1f} GB)" if plan.total else "") + "; deltatune plan shows the parts", flush=True)
    refuse_unless_fits(cfg, plan, force)


def memory_plan(cfg: RunConfig) -> list[str]:
    """`deltatune plan`: the run's memory plan on this machine's device, without running it."""
    device = pick_device()
    return plan_lines(cfg, plan_memory(cfg, TASKS[cfg.task], device, resolve_bf16(cfg.memory.bf16, device)))


def read_splits(cfg: RunConfig, task: Task) -> Splits:
    """The records of every split, validated; for a task whose examples are cached, what this reading
    decided is cached too, by the files' bytes: a warm start then reads none of the training records."""
    if cfg.data.streaming:
        return stream_splits(cfg, task)
    key, entry, folder = None, None, cache_dir() / "splits"
    if task.cached_examples:
        with stage("hashing the data files"):
            key = reading_key(reading_files(cfg.data), reading_settings(cfg, task))
            entry = load_reading(folder, key) if key else None
    if entry is not None:
        note(f"reading: the data files are as when last read; {entry['train_count']} training records "
             "(read again only if their examples are not cached)")
        train = DeferredRecords(entry["train_count"], entry["train_digest"], lambda: read_records(cfg, task).train)
        return Splits(train, entry["val"], entry["test"], [SourceShare(**share) for share in entry["mix"]])
    splits = read_records(cfg, task)
    if key:
        splits.train = DeferredRecords.of(splits.train)  # hashed once, here, for both caches
        save_reading(folder, key, {"train_count": len(splits.train), "train_digest": splits.train.digest,
                                   "val": splits.val, "test": splits.test,
                                   "mix": [asdict(share) for share in splits.mix]})
    return splits


def reading_files(data) -> list[str | None]:
    """Every file a run reads its records from, in a fixed order."""
    return [*(source.path for source in training_sources(data)), data.validation_file, data.test_file]


def reading_settings(cfg: RunConfig, task: Task) -> dict:
    """Every setting that changes which records each split holds (the paths too: records name their file)."""
    data = cfg.data
    return {"task": task.name, "seed": cfg.seed, "max_eval_samples": cfg.eval.max_eval_samples,
            **data.model_dump(include={"train_file", "datasets", "columns", "validation_file", "validation_split",
                                       "test_file", "format"}, mode="json")}


def read_records(cfg: RunConfig, task: Task) -> Splits:
    data = cfg.data
    sources = training_sources(data)
    trains, val = [], []
    for source in sources:
        with stage(f"reading {source.path}") as advance:
            records, fmt = load_records(source.path, source.format, columns=source.columns, split=source.split,
                                        config=source.config)
            advance(len(records))
        check_format(source.path, fmt, task)
        if not data.validation_file:  # each source gives its own share of the held-out records
            records, held_out = split_records(records, data.validation_split, cfg.seed)
            val += held_out
        trains.append((source.path, records, source.weight))
    if data.test_file and task.test_file_hint:
        raise UserError(f"test_file: {task.test_file_hint} (give {data.test_file} as validation_file instead)")
    held_fmt = data.format if data.datasets else fmt  # a mix's sources may differ: held-out files say their own
    if data.validation_file:
        val = load_records(data.validation_file, held_fmt, columns=data.columns, role="validation")[0]
    train, mix = draw_mix(trains, cfg.seed) if data.datasets else (trains[0][1], [])
    test = load_records(data.test_file, held_fmt, columns=data.columns, role="test")[0] if data.test_file else []
    limit = cfg.eval.max_eval_samples
    if len(val) > (limit or len(val)) or len(test) > (limit or len(test)):
        print(f"evaluating a seeded sample of {limit} records of each held-out split (validation {len(val)}, "
              f"test {len(test)}; max_eval_samples)", flush=True)
    return Splits(train, seeded_sample(val, limit, cfg.seed), seeded_sample(test, limit, cfg.seed), mix)


def check_format(path, fmt: str, task: Task) -> None:
    if fmt not in task.formats:
        raise UserError(f"{path}: format '{fmt}' does not fit task '{task.name}', which needs "
                        f"one of {', '.join(task.formats)} (set task: or format:)")


def stream_splits(cfg: RunConfig, task: Task) -> Splits:
    """streaming: the held-out files read as usual; of the training file only its first record, for the format."""
    data = cfg.data
    first = next(read_raw(data.train_file, columns=data.columns), None)
    if first is None:
        raise UserError(f"{data.train_file}: no records found (add at least one)")
    fmt = known_format(first[1], data.format, where(data.train_file, first[0]))
    check_format(data.train_file, fmt, task)
    val = load_records(data.validation_file, fmt, columns=data.columns, role="validation")[0] \
        if data.validation_file else []
    test = load_records(data.test_file, fmt, columns=data.columns, role="test")[0] if data.test_file else []
    limit = cfg.eval.max_eval_samples
    return Splits([], seeded_sample(val, limit, cfg.seed), seeded_sample(test, limit, cfg.seed),
                  stream=lambda: stream_records(data.train_file, fmt, columns=data.columns))


def stream_examples(splits: Splits, cfg: RunConfig, task: Task, tokenizer) -> ExampleStream:
    """The training examples of a streaming run: as many positions as max_steps asks for, made as they are read."""
    args = cfg.train
    length = (args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
              * distributed.world_size())
    settings = {"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed, "tokenizer": tokenizer_digest(tokenizer)}
    key = reading_key(reading_files(cfg.data), settings) or reading_key([], settings)  # a hub id: its name only
    note(f"streaming {cfg.data.train_file}: {length} training examples ({args.max_steps} steps) tokenised as "
         f"training reads them, through a seeded shuffle buffer of {SHUFFLE_BUFFER} records")
    return ExampleStream(splits.stream, task.stream_maker(cfg, tokenizer), length, cfg.seed, key,
                         str(cfg.data.train_file), cfg.data.max_seq_length)


def tokenize_splits(splits: Splits, cfg: RunConfig, task: Task, tokenizer, model=None) -> Datasets:
    builder = task.example_builder(cfg, tokenizer, model)
    stats = {}

    def build(records, name: str, split: str):
        with stage(f"tokenising {split}", total=len(records)) as advance:
            return builder(records, name=name, progress=advance)
    if splits.stream is not None:
        train = stream_examples(splits, cfg, task, tokenizer)
        stats = {"train": train.stats}  # counted as training reads the stream
    else:
        train, stats["train"] = build(splits.train, str(cfg.data.train_file or "the training mix"), "train")
    val: list[Example] = []
    if splits.val:
        val, stats["validation"] = build(splits.val, "validation data", "validation")
    # Scored by the loss path as well (a classifier's test records are examples too); sft and text score
    # their test records by generation, so only tasks with a new head tokenise them.
    test_examples = build(splits.test, str(cfg.data.test_file), "test")[0] if task.new_head and splits.test else []
    for split, s in stats.items():
        if s.truncated or s.dropped_no_labels:
            print(f"{split}: {s.truncated} examples truncated at max_seq_length={cfg.data.max_seq_length}, "
                  f"{s.dropped_no_labels} dropped with no trained tokens left", flush=True)
    mix = mix_rows(splits.mix, train)
    for row in mix:
        print(f"mix: {row['source']}: {row['drawn']} of the training draws from {row['available']} records "
              f"(weight {row['weight']:g}), {100 * row['token_share']:.1f} % of the training tokens", flush=True)
    return Datasets(train, val, splits.test, stats, test_examples, splits.val, mix)


def mix_rows(shares, train) -> list[dict]:
    """Each source of a training mix with its share of the training tokens (examples name their source file)."""
    if not shares:
        return []
    if isinstance(train, ExampleTable):  # read two columns, not a million examples
        sources, lengths = train.sources(), train.lengths()
    else:
        sources, lengths = [ex.source for ex in train], [len(ex.input_ids) for ex in train]
    tokens = {share.name: 0 for share in shares}
    for source, n in zip(sources, lengths):
        name = source.rsplit(":", 1)[0]  # "FILE:LINE" or "FILE:row N"
        if name in tokens:
            tokens[name] += n
    total = max(sum(tokens.values()), 1)
    return [{**share.as_record(), "tokens": tokens[share.name], "token_share": tokens[share.name] / total}
            for share in shares]


def prepare_output_dir(cfg: RunConfig, resuming: bool = False) -> Path:
    """`resuming`: find_resume_checkpoint has checked that a non-empty output_dir is this run's."""
    out = Path(cfg.output.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file (choose a folder path)")
    if out.is_dir() and has_content(out) and not cfg.output.overwrite_output_dir and not resuming:
        raise UserError(f"output_dir '{out}' is not empty (choose a new folder, set overwrite_output_dir: true, "
                        "or pass --resume to continue the run that is there)")
    with writing("config.yaml", out):
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return out


def open_run(cfg: RunConfig, resume: Path | None):
    """(output folder, metrics log): rank 0 prepares the folder (a resume first puts it back as the
    checkpoint had it) and opens the log; the other ranks write nothing."""
    if not distributed.is_main():
        return Path(cfg.output.output_dir), NullLog()
    out = prepare_output_dir(cfg, resuming=cfg.output.resume_from_checkpoint is not None)
    # A resume puts the folder back as its checkpoint had it; a fresh start (overwrite_output_dir)
    # drops an earlier run's checkpoints and log, so nothing of two runs is interleaved.
    resumed_step = restore_run_files(out, resume)
    # purge_step: on resume, TensorBoard hides what the killed run logged after the checkpoint.
    trackers = open_trackers(cfg.output.report_to, out, cfg.flat(), resuming=resume is not None,
                             purge_step=resumed_step + 1 if resume else None)
    return out, MetricsLog(out, trackers)


def fit_run(cfg: RunConfig, out: Path, log, device: torch.device, resume: Path | None = None,
            task: Task | None = None) -> FitRun:
    """What `fit` needs of this run besides TrainArgs and MemoryArgs."""
    task = task or TASKS[cfg.task]
    return FitRun(out_dir=out, log=log, device=device, seed=cfg.seed, loss_fn=task.loss(cfg), units=task.units,
                  packs=task.packs,
                  eval_batch_size=cfg.eval.per_device_eval_batch_size, keep_checkpoints=cfg.output.save_total_limit,
                  config=cfg.flat(), resume=resume)


def evaluate_model(task: Task, model, tokenizer, data: Datasets, cfg: RunConfig, device, bf16,
                   which: str = "the model") -> dict:
    """The task's evaluation, on every rank (FSDP needs all of them for each forward)."""
    with torch.no_grad(), stage(f"evaluating {which}", unit="examples") as advance:
        result = distributed.call(model, task.evaluate, tokenizer, data, cfg, device, bf16)
        advance(len(data.val) + len(data.test))
        return result


def without_predictions(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "predictions"}


def run(cfg: RunConfig, force: bool = False) -> RunResult:
    """One training run, as `deltatune train` does it (`force`: even where the memory plan says it will not fit)."""
    task = TASKS[cfg.task]
    if cfg.model.torch_dtype == "auto":  # what it became is in config.yaml: a resume loads the same
        cfg = cfg.with_overrides(torch_dtype=weights_dtype(cfg.model))
    with preflight(cfg, force) as checked:  # the output folder is this run's until the run ends
        device, bf16, resume = checked.device, checked.bf16, checked.resume
        splits = read_splits(cfg, task)
        model, tokenizer = task.load(cfg, splits)
        data = tokenize_splits(splits, cfg, task, tokenizer, model)
        torch.manual_seed(cfg.seed)  # new weights (LoRA, a classifier head) start the same on every rank
        model = apply_method(model, cfg.model, task.peft_task_type, task.new_head)
        trained = trainable_summary(model)
        print(f"method: {cfg.model.method}", *trained.lines(), sep="\n", flush=True)
        out, log = open_run(cfg, resume)
        model = distributed.wrap_model(model, cfg.parallel.parallelism, device, cfg.parallel.fsdp_cpu_offload)
        task.before_training(cfg, model, tokenizer, data, out, resume, device, bf16)  # preference: the reference
        before = evaluate_model(task, model, tokenizer, data, cfg, device, bf16, "the base")
        with contextlib.closing(log):
            if resume is None:
                log.write({"step": 0, "event": "method", "method": cfg.model.method, **trained.as_record()})
                log.write({"step": 0, "event": "base_eval", **without_predictions(before)})
                if data.mix:  # the delta report names the mix from here
                    log.write({"step": 0, "event": "data_mix", "sources": data.mix})
            result = fit(model, tokenizer, data.train, data.val, cfg.train, cfg.memory,
                         fit_run(cfg, out, log, device, resume, task))
            after = evaluate_model(task, model, tokenizer, data, cfg, device, bf16, "the tuned model")
            log.write({"step": result.steps, "event": "tuned_eval", **without_predictions(after)})
            save_final(model, tokenizer, result, out)
            if distributed.is_main():
                delta = report(cfg, task, distributed.unwrap(model), tokenizer, data, before, after, result, out,
                               device, trained)
                log.summary(closing_numbers(before, after, delta), result.steps)  # to the trackers
                log.artifacts([out / name for name in ARTIFACTS])
        return RunResult(out, before, after, result)


def save_final(model, tokenizer, result: FitResult, out: Path) -> None:
    """final/, only from finite weights and a finite loss (collective under torchrun)."""
    if not distributed.all_finite(model):
        raise UserError("training produced non-finite weights; final/ was not written "
                        "(lower learning_rate, check the data)")
    if not math.isfinite(result.train_loss):
        raise UserError("training loss is not finite; final/ was not written (lower learning_rate, check the data)")
    distributed.save_model(model, tokenizer, out / "final")


ARTIFACTS = ("summary.md", "report.md", "report.html", "delta.json", "config.yaml")


def closing_numbers(before: dict, after: dict, delta: dict | None) -> dict[str, float]:
    """The run's headline numbers for the trackers: `base/<metric>`, `tuned/<metric>`, and every number
    of the delta report's task, forgetting and weight sections as `delta/<path>`."""
    numbers = {f"{side}/{k}": float(v) for side, ev in (("base", before), ("tuned", after)) for k, v in ev.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}/{key}", value)
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            numbers[prefix] = float(node)
    for section in ("task", "forgetting"):
        walk(f"delta/{section}", (delta or {}).get(section))
    if delta and isinstance(delta.get("weights"), dict):
        walk("delta/weights/relative_norm", delta["weights"].get("relative_norm"))
    return numbers


def report(cfg: RunConfig, task: Task, model, tokenizer, data: Datasets, before: dict, after: dict,
           result: FitResult, out: Path, device, trained) -> dict | None:
    """Rank 0: summary.md, the before/after table and the delta report (returned; None when off)."""
    task.save_extras(model, out / "final")
    write_summary(out, model=cfg.model.name, before=before, after=after, fit=result, data_stats=data.stats,
                  extra=[*mix_markdown(data.mix), "", "## Method", "", f"- method: {cfg.model.method}",
                         *(f"- {line}" for line in trained.lines()), *task.summary_lines(before, after)])
    print_comparison(before, after)
    print(f"tuned model: {out / 'final'}\nsummary: {out / 'summary.md'}")
    if not cfg.delta.delta_report:
        return None
    trim_heap()  # the optimizer's and gradients' freed memory goes back before the report measures
    if distributed.world_size() > 1:
        # The other ranks have left; rank 0 measures alone, on final/ loaded as a plain model
        # (FSDP's weights are shards, and no rank must wait on another for the report's length).
        model = task.load_tuned(str(out / "final"), allow_pickle=cfg.model.allow_pickle,
                                trust_remote_code=cfg.model.trust_remote_code)[0]
        model.to(device).eval()
    return task.delta_report(cfg, model, tokenizer, data, before, after, result, out, device)
