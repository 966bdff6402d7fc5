"""`deltatune` command line: thin wrappers over the pipeline stages.

    deltatune train CONFIG.yaml [key=value ...]
    deltatune eval --model DIR --data FILE [--metric exact_match]
    deltatune generate --model DIR "prompt"
    deltatune chat --model DIR
    deltatune demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deltatune.errors import UserError


def cmd_train(args) -> int:
    from deltatune.config import load_config
    from deltatune.pipeline import run

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, once, before any process starts
    if args.nproc > 1:
        exec_torchrun(args)
    from deltatune.distributed import peer_failures_explained, shutdown

    with peer_failures_explained(cfg.ddp_timeout):
        run(cfg)
    shutdown()  # under torchrun: leave the process group cleanly
    return 0


def exec_torchrun(args) -> None:
    """Replace this process with torchrun starting `nproc` copies of this same command."""
    if "LOCAL_RANK" in os.environ:
        raise UserError("--nproc: already running under torchrun (drop --nproc, or launch without torchrun)")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "deltatune", *(["--debug"] if args.debug else []), "train", args.config, *args.overrides]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def cmd_demo(args) -> int:
    from deltatune import demo_task
    from deltatune.config import load_config
    from deltatune.pipeline import run

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out}: demo folder is not empty (pass --overwrite or --out NEW_DIR)")
    paths = demo_task.write(out / "data")
    defaults = [f"train_file={paths['train']}", f"validation_file={paths['validation']}",
                f"test_file={paths['test']}", f"output_dir={out / 'run'}", "overwrite_output_dir=true",
                "model=smollm2-135m-instruct", "learning_rate=1e-4", "num_train_epochs=1",
                "per_device_train_batch_size=8", "per_device_eval_batch_size=16", "warmup_ratio=0.1",
                "max_seq_length=128", "max_new_tokens=32", "logging_steps=5"]
    run(load_config(None, defaults + list(args.overrides)))
    return 0


def _load_for_inference(model_path: str, allow_pickle: bool, trust_remote_code: bool):
    from deltatune.model import load_causal_lm
    from deltatune.pipeline import pick_device

    model, tokenizer = load_causal_lm(model_path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    device = pick_device()
    return model.to(device).eval(), tokenizer, device


def cmd_generate(args) -> int:
    from deltatune.evaluate import generate

    model, tokenizer, device = _load_for_inference(args.model, args.allow_pickle, args.trust_remote_code)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    print(generate(model, tokenizer, [messages], max_new_tokens=args.max_new_tokens, device=device)[0])
    return 0


def cmd_chat(args) -> int:
    from deltatune.evaluate import generate

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


def cmd_eval(args) -> int:
    from deltatune.data import build_sft_examples
    from deltatune.evaluate import evaluate
    from deltatune.formats import CHAT_FORMATS, load_records
    from deltatune.train import resolve_bf16

    records, fmt = load_records(args.data, args.format)
    if fmt not in CHAT_FORMATS:
        raise UserError(f"{args.data}: format '{fmt}' has no conversations to evaluate")
    model, tokenizer, device = _load_for_inference(args.model, args.allow_pickle, args.trust_remote_code)
    examples, _ = build_sft_examples(records, tokenizer, max_seq_length=args.max_seq_length, name=args.data)
    result = evaluate(model, tokenizer, loss_examples=examples, metric_records=records, metric=args.metric,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=device,
                      bf16=resolve_bf16("auto", device), keep_predictions=args.show)
    result = {"model": args.model, "data": str(args.data), **result}
    text = json.dumps(result, indent=2)
    out = Path(args.out) if args.out else Path(f"eval_{Path(args.data).stem}.json")
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"written: {out}", file=sys.stderr)
    return 0


def _add_model_safety(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin/.pt) weights, which can run code")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Fine-tune language models and measure what changed.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes of this machine (one per GPU) via torchrun")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="fine-tune the embedded SmolLM2 on the bundled task and compare")
    p.add_argument("--out", default="runs/demo", help="folder for the demo data and run (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out folder")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the demo's")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="loss, perplexity and exact match of a model on a data file")
    p.add_argument("--model", required=True, help="model folder, .gguf file or embedded name")
    p.add_argument("--data", required=True, help="JSONL/JSON/CSV conversations with reference answers")
    p.add_argument("--format", default="auto", help="data format (default: detect)")
    p.add_argument("--metric", default="exact_match", choices=["exact_match", "none"])
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--show", type=int, default=5, help="include this many predictions in the output")
    p.add_argument("--out", help="JSON file to write (default eval_<data name>.json)")
    _add_model_safety(p)
    p.set_defaults(func=cmd_eval)

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
