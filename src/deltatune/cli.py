"""`deltatune` command line: thin wrappers over the pipeline stages.

    deltatune train CONFIG.yaml [key=value ...] [--force]
    deltatune plan CONFIG.yaml [key=value ...]
    deltatune eval --model DIR --data FILE [--metric exact_match]
    deltatune predict --model CLASSIFIER --data FILE --out FILE.jsonl
    deltatune generate --model DIR "prompt"
    deltatune chat --model DIR
    deltatune demo
    deltatune prepare SOURCES... --out pairs.jsonl [--strategy template|model]
    deltatune lint DATA [--model M] [--max-seq-length N] [--validation FILE] [--json]
    deltatune lint --config CONFIG      (each source of the run's training data, and the mix)
    deltatune merge --adapter DIR --out DIR
    deltatune export --model DIR --format gguf --out FILE.gguf
    deltatune compare --base A --tuned B --data FILE
    deltatune sweep CONFIG.yaml --grid learning_rate=1e-5,5e-5 num_train_epochs=1,3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from deltatune.config import default
from deltatune.errors import UserError


def _run_until_stopped(cfg, again: str | None, force: bool = False) -> int:
    """Run the pipeline; a SIGINT/SIGTERM that ended it with a checkpoint exits 130/143 saying how to go on."""
    from deltatune.pipeline import run
    from deltatune.runtime.distributed import is_main, peer_failures_explained, shutdown
    from deltatune.train.checkpoint import StopRequested

    try:
        with peer_failures_explained(cfg.parallel.ddp_timeout):
            run(cfg, force)
    except StopRequested as stop:
        if is_main():  # under torchrun every rank stopped at the same step; one says so
            print(f"stopped: {stop}" + (f"; continue with: {again}" if again else ""), file=sys.stderr)
        return stop.exit_code
    shutdown()  # under torchrun: leave the process group cleanly
    return 0


def cmd_train(args) -> int:
    from deltatune.config import load_config
    from deltatune.runtime.distributed import exec_torchrun, launcher

    overrides = list(args.overrides) + (["resume_from_checkpoint=latest"] if args.resume else [])
    cfg = load_config(args.config, overrides)  # a bad config fails here, once, before any process starts
    if args.nproc > 1:
        check_resume_before_launch(cfg, args.nproc)
        exec_torchrun(args.nproc, [*(["--debug"] if args.debug else []), "train", args.config, *args.overrides,
                                   *(["--resume"] if args.resume else []), *(["--force"] if args.force else [])])
    return _run_until_stopped(cfg, " ".join([*launcher(), args.config, *args.overrides, "--resume"]), args.force)


def cmd_plan(args) -> int:
    from deltatune.config import load_config
    from deltatune.pipeline import memory_plan

    print("\n".join(memory_plan(load_config(args.config, args.overrides))))
    return 0


def check_resume_before_launch(cfg, nproc: int) -> None:
    """A resume that would be refused (other world size, other config) fails here with one line,
    not once per process inside torchrun. Quiet: rank 0 prints what it resumes from."""
    import contextlib
    import io

    from deltatune.train.checkpoint import find_resume_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        find_resume_checkpoint(cfg, world_size=nproc)


def cmd_demo(args) -> int:
    from deltatune.config import load_config
    from deltatune.demo import orders

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out}: demo folder is not empty (pass --overwrite or --out NEW_DIR)")
    paths = orders.write(out / "data")
    defaults = [f"train_file={paths['train']}", f"validation_file={paths['validation']}",
                f"test_file={paths['test']}", f"output_dir={out / 'run'}", "overwrite_output_dir=true",
                "model=smollm2-135m-instruct", "learning_rate=1e-4", "num_train_epochs=1",
                "per_device_train_batch_size=8", "per_device_eval_batch_size=16", "warmup_ratio=0.1",
                "max_seq_length=128", "max_new_tokens=32", "logging_steps=5"]
    return _run_until_stopped(load_config(None, defaults + list(args.overrides)), again=None)


def cmd_compare(args) -> int:
    from deltatune.delta.measures import CompareSettings, ReportOptions
    from deltatune.tasks import compare_models

    options = ReportOptions(general_text_file=args.general_text, probe_files=tuple(args.probe_file),
                            side_by_side=args.side_by_side, kl_samples=args.kl_samples, batch_size=args.batch_size,
                            benchmarks=tuple(b for b in (args.benchmarks or "").split(",") if b),
                            benchmark_limit=args.benchmark_limit, benchmark_tasks_dir=args.benchmark_tasks_dir)
    from deltatune.delta.benchmarks import check_available

    check_available(options.benchmarks, options.benchmark_tasks_dir)  # before the models load
    settings = CompareSettings(options=options, check=_check(args), max_examples=args.max_examples,
                               max_seq_length=args.max_seq_length, max_new_tokens=args.max_new_tokens,
                               allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    compare_models(args.base, args.tuned, args.data, Path(args.out), args.format, settings)
    return 0


def cmd_sweep(args) -> int:
    from deltatune.sweep import Budget, run_sweep

    run_sweep(args.config, args.grid, args.overrides,
              Budget(args.max_perplexity_increase, args.min_fact_retention, args.min_cka))
    return 0


def _load_for_inference(model_path: str, allow_pickle: bool, trust_remote_code: bool):
    from deltatune.model.load import load_causal_lm
    from deltatune.runtime.precision import pick_device

    model, tokenizer = load_causal_lm(model_path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    device = pick_device()
    return model.to(device).eval(), tokenizer, device


def cmd_generate(args) -> int:
    from deltatune.evaluate.generate import generate

    model, tokenizer, device = _load_for_inference(args.model, args.allow_pickle, args.trust_remote_code)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    print(generate(model, tokenizer, [messages], max_new_tokens=args.max_new_tokens, device=device)[0])
    return 0


def cmd_chat(args) -> int:
    from deltatune.evaluate.generate import generate

    model, tokenizer, device = _load_for_inference(args.model, args.allow_pickle, args.trust_remote_code)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, [history], max_new_tokens=args.max_new_tokens, device=device)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    return 0


def _file_settings(args, check=None):
    from deltatune.evaluate.data_files import FileSettings
    from deltatune.evaluate.metrics import Check

    return FileSettings(fmt=getattr(args, "format", "auto"), check=check or Check(), max_seq_length=args.max_seq_length,
                        max_new_tokens=getattr(args, "max_new_tokens", default("max_new_tokens")),
                        batch_size=args.batch_size, show=getattr(args, "show", 0), allow_pickle=args.allow_pickle,
                        trust_remote_code=args.trust_remote_code)


def cmd_eval(args) -> int:
    from deltatune.tasks import evaluate_file

    result = evaluate_file(args.model, args.data, _file_settings(args, _check(args)))
    result = {"model": args.model, "data": str(args.data), **result}
    text = json.dumps(result, indent=2)
    out = Path(args.out) if args.out else Path(f"eval_{Path(args.data).stem}.json")
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"written: {out}", file=sys.stderr)
    return 0


def cmd_predict(args) -> int:
    from deltatune.tasks import predict_file

    out = Path(args.out)
    n = predict_file(args.model, args.data, out, _file_settings(args), overwrite=args.overwrite)
    print(f"predicted {n} records: {out}")
    return 0


def _load_tokenizer(name: str, trust_remote_code: bool):
    """Only the tokenizer: prepare and lint count tokens but need no weights."""
    from deltatune.model.load import load_tokenizer, resolve

    return load_tokenizer(resolve(name), trust_remote_code=trust_remote_code)


def cmd_prepare(args) -> int:
    from deltatune.docs.prepare import check_output, prepare
    from deltatune.files import lock_output_file
    from deltatune.tasks import TASKS

    out = Path(args.out)
    with lock_output_file(out):  # one prepare per --out file at a time
        check_output(out, args.overwrite)  # before any work: an existing file is never replaced silently
        return _prepare(args, out, TASKS[args.task].prepares, prepare)


def _prepare(args, out: Path, kind: str, prepare) -> int:
    """`kind`: question/answer pairs (a local instruct model writes them with --strategy model), or
    labelled text from class folders."""
    generate = None
    if args.strategy == "model" and kind == "pairs":
        from deltatune.evaluate.generate import generate as generate_text

        model, tokenizer, device = _load_for_inference(args.model, args.allow_pickle, args.trust_remote_code)

        def generate(conversations):
            return generate_text(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                                 device=device)
    else:
        tokenizer = _load_tokenizer(args.model, args.trust_remote_code)
    summary = prepare(args.sources, out, tokenizer=tokenizer, max_tokens=args.max_tokens, strategy=args.strategy,
                      kind=kind, label_from=args.label_from, generate=generate)
    print("\n".join(summary.lines(out, args.max_tokens)))
    return 0


def cmd_lint(args) -> int:
    from deltatune.config import load_config
    from deltatune.data.lint import lint, lint_run_data, print_mix, print_report
    from deltatune.data.templates import use_template

    if (args.data is None) == (args.config is None):
        raise UserError("lint takes a DATA file or --config CONFIG (whose training sources it checks), one of them")
    sample = None if args.sample == 0 else args.sample
    cfg = load_config(args.config) if args.config else None
    tokenizer = _load_tokenizer(cfg.model.name if cfg else args.model, args.trust_remote_code)
    use_template(tokenizer, cfg.model.chat_template if cfg else args.chat_template)
    if cfg:
        reports, mix = lint_run_data(cfg.data, tokenizer, sample)
    else:
        columns = dict(pair.split("=", 1) for pair in args.columns or []) or None
        reports, mix = [lint(args.data, tokenizer, max_seq_length=args.max_seq_length, validation=args.validation,
                             fmt=args.format, train_on_inputs=args.train_on_inputs, columns=columns,
                             sample=sample)], []
    if args.json:
        print(json.dumps({"sources": reports, "mix": mix} if cfg else reports[0], indent=2, ensure_ascii=False))
    else:
        for report in reports:
            print_report(report)
        print_mix(mix)
    return 1 if any(report["errors"] for report in reports) else 0


def cmd_merge(args) -> int:
    from deltatune.model.load import merge_adapter
    from deltatune.tasks import task_for_folder

    out = merge_adapter(Path(args.adapter), Path(args.out), lambda folder: task_for_folder(folder).load_tuned(
        folder, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code))
    print(f"merged model: {out}")
    return 0


def cmd_export(args) -> int:
    from deltatune.model.export import export_gguf

    out = export_gguf(args.model, Path(args.out), dtype=args.dtype, allow_pickle=args.allow_pickle)
    print(f"written: {out}")
    return 0


def _add_metric(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default=default("metric"),
                   choices=["exact_match", "contains", "regex", "json_schema", "none"])
    p.add_argument("--metric-pattern", help="with --metric regex: the regex an output must fully match")
    p.add_argument("--metric-schema", help="with --metric json_schema: JSON Schema file an output must satisfy")


def _check(args):
    """The metric flags, checked by the config's own rule (EvalArgs), then loaded."""
    from deltatune.config import eval_args
    from deltatune.evaluate.metrics import load_check

    try:
        ev = eval_args("command line", metric=args.metric, metric_pattern=args.metric_pattern,
                       metric_schema=args.metric_schema)
    except UserError as err:  # the rule in the flags' own names: metric_pattern -> --metric-pattern
        raise UserError(re.sub(r"\bmetric(_pattern|_schema)?\b", lambda m: "--" + m.group(0).replace("_", "-"),
                               str(err).replace("key 'config': ", ""))) from None
    return load_check(ev.metric, ev.metric_pattern, ev.metric_schema)


def _add_model_safety(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin/.pt) weights, which can run code")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune",
                                     description="Fine-tune language models and measure what changed.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in output_dir (resume_from_checkpoint=latest)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes of this machine (one per GPU) via torchrun")
    p.add_argument("--force", action="store_true", help="run even where the memory plan says it will not fit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="what a run will need in memory (from config.json alone), without running it")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="fine-tune the embedded SmolLM2 on the bundled task and compare")
    p.add_argument("--out", default="runs/demo", help="folder for the demo data and run (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out folder")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the demo's")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="score a model on a data file: loss, perplexity and the metric (causal LM); "
                                    "loss, accuracy, macro-F1, per-class scores, confusion matrix (classifier)")
    p.add_argument("--model", required=True, help="model folder, .gguf file or embedded name")
    p.add_argument("--data", required=True, help="JSONL/JSON/CSV conversations with reference answers, "
                                                 "or {text, label} records for a classifier")
    p.add_argument("--format", default="auto", help="data format (default: detect)")
    _add_metric(p)
    p.add_argument("--max-seq-length", type=int, default=default("max_seq_length"))
    p.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens"))
    p.add_argument("--batch-size", type=int, default=default("per_device_eval_batch_size"))
    p.add_argument("--show", type=int, default=5, help="include this many predictions in the output")
    p.add_argument("--out", help="JSON file to write (default eval_<data name>.json)")
    p.add_argument("--json", action="store_true", help="stdout is the result as JSON (it always is; for scripts)")
    _add_model_safety(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="label a file's {text[, text_pair]} records with a classifier")
    p.add_argument("--model", required=True, help="classifier folder (a classification run's final/)")
    p.add_argument("--data", required=True, help="JSONL/JSON/CSV records with text (and text_pair); labels optional")
    p.add_argument("--out", required=True, help="JSONL to write: each record with predicted and probabilities")
    p.add_argument("--max-seq-length", type=int, default=default("max_seq_length"))
    p.add_argument("--batch-size", type=int, default=default("per_device_eval_batch_size"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_model_safety(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("compare", help="delta report (task gain, forgetting, weight change) for any two models")
    p.add_argument("--base", required=True, help="base model: folder, .gguf file or embedded name")
    p.add_argument("--tuned", required=True, help="tuned model folder (a deltatune run's final/ adds its curves)")
    p.add_argument("--data", required=True,
                   help="JSONL/JSON/CSV conversations with reference answers, or {text, label} records for classifiers")
    p.add_argument("--out", default="delta_report", help="folder for report.md/html and delta.json")
    p.add_argument("--format", default="auto", help="data format (default: detect)")
    _add_metric(p)
    p.add_argument("--max-examples", type=int, default=None,
                   help="use at most this many records of --data "
                        "(default: 64 conversations, every classification record)")
    p.add_argument("--max-seq-length", type=int, default=default("max_seq_length"))
    p.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens"))
    p.add_argument("--batch-size", type=int, default=default("per_device_eval_batch_size"))
    p.add_argument("--general-text", help="UTF-8 text file for forgetting (default: CPython's pydoc topics)")
    p.add_argument("--probe-file", action="append", default=[], help="extra fact-recall probes (prompt/answer)")
    p.add_argument("--side-by-side", type=int, default=default("side_by_side_prompts"),
                   help="prompts shown side by side")
    p.add_argument("--kl-samples", type=int, default=default("kl_samples"),
                   help="base-model samples for the KL estimate")
    p.add_argument("--benchmarks", metavar="TASK,TASK", help="lm-evaluation-harness tasks for the forgetting section")
    p.add_argument("--benchmark-limit", type=int, default=default("benchmark_limit"), help="samples per benchmark task")
    p.add_argument("--benchmark-tasks-dir", help="folder of your own lm-eval task YAML files")
    _add_model_safety(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="train a grid of settings and write the task-gain vs forgetting frontier")
    p.add_argument("config", help="YAML config file (its output_dir holds one folder per run)")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="values to try per key, e.g. learning_rate=1e-5,5e-5 num_train_epochs=1,3")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="fixed overrides applied to every run")
    p.add_argument("--max-perplexity-increase", type=float, default=0.10, metavar="X",
                   help="forgetting budget of the recommendation: general-text perplexity rise (default 0.10 = +10%%)")
    p.add_argument("--min-fact-retention", type=float, default=0.90, metavar="X",
                   help="forgetting budget: share of the base's facts kept (default 0.90)")
    p.add_argument("--min-cka", type=float, default=0.90, metavar="X",
                   help="forgetting budget for classifiers: backbone CKA on general text (default 0.90)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("generate", help="greedy answer of a model to one prompt")
    p.add_argument("--model", required=True)
    p.add_argument("prompt")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    _add_model_safety(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with a model")
    p.add_argument("--model", required=True)
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    _add_model_safety(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("prepare", help="turn documents (PDF, Markdown, HTML, text) into training records")
    p.add_argument("sources", nargs="+", help="document files or folders of them")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--strategy", default="template", choices=["template", "model"],
                   help="template: deterministic pairs; model: a local instruct model writes questions")
    p.add_argument("--model", default=default("model"),
                   help="whose tokenizer measures chunks, and the question writer for --strategy model")
    p.add_argument("--max-tokens", type=int, default=256, help="token budget of one chunk (default 256)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation limit for --strategy model")
    p.add_argument("--task", default="sft", choices=["sft", "classification"])
    p.add_argument("--label-from", choices=["folder"], help="classification labels: the class folder's name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_model_safety(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("lint", help="check a data file the way training reads it, and report what it holds")
    p.add_argument("data", nargs="?", help="JSONL/JSON/CSV/parquet/Arrow file, save_to_disk folder or hf://owner/name")
    p.add_argument("--config", help="check a run config's training data instead: each source of a mix, and the mix")
    p.add_argument("--model", default=default("model"), help="whose tokenizer and chat template to use")
    p.add_argument("--max-seq-length", type=int, default=default("max_seq_length"))
    p.add_argument("--validation", help="validation file to check for overlap with DATA")
    p.add_argument("--format", default="auto", help="data format (default: detect)")
    p.add_argument("--train-on-inputs", action="store_true", help="count every token as trained, as training would")
    p.add_argument("--chat-template", help="a built-in template name or a Jinja file, as the chat_template key")
    p.add_argument("--columns", nargs="*", metavar="FIELD=COLUMN", help="read a format field from another column")
    p.add_argument("--sample", type=int, default=20_000,
                   help="tokenise a seeded sample of this many records of a bigger file (0: all; default 20000)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    p.set_defaults(func=cmd_lint)
    p = sub.add_parser("merge", help="fold a LoRA/DoRA adapter into its base model and save a full model")
    p.add_argument("--adapter", required=True, help="adapter folder (a run's final/ with adapter_config.json)")
    p.add_argument("--out", required=True, help="new folder for the merged model")
    _add_model_safety(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a causal LM as a GGUF file (llama.cpp, Ollama, transformers)")
    p.add_argument("--model", required=True, help="model folder, adapter folder or embedded name")
    p.add_argument("--format", default="gguf", choices=["gguf"])
    p.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="tensor type of the weight matrices (default f16)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin/.pt) weights, which can run code")
    p.set_defaults(func=cmd_export)
    return parser


def _quiet_libraries() -> None:
    """Our own progress and errors are the output; library bars and advice are noise on stderr."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
