"""The delta report of a causal LM: task gain, forgetting and weight change, base against tuned.

- task: validation loss (token-weighted, paired bootstrap CI of the gain) and the task metric
  on the test records' greedy answers; KL(base‖tuned) per token on the validation text;
- forgetting: perplexity and KL on a fixed seeded sample of general text, KL on continuations
  sampled from the base model, and fact recall on the built-in probes (plus the user's);
- weights: per-matrix ‖ΔW‖/‖W‖, effective rank of ΔW and intruder dimensions;
- side by side: held-out prompts with the reference, the base answer and the tuned answer.

The delta.json it writes is documented in delta/render.py.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path

from deltatune.data.examples import build_sft_examples
from deltatune.data.formats import Record
from deltatune.delta import benchmarks
from deltatune.delta import measures as delta
from deltatune.delta.measures import AdaptersOff, CompareSettings, ReportOptions, computing, load_probe_sets, timed
from deltatune.delta.render import (
    SCHEMA,
    SCHEMA_VERSION,
    ReportKind,
    display_name,
    fmt,
    md_table,
    pct,
    publish,
    training_markdown,
    training_section,
    weight_markdown,
)
from deltatune.delta.weights import weight_delta
from deltatune.errors import UserError
from deltatune.evaluate import probes
from deltatune.evaluate.evaluate import references
from deltatune.evaluate.generate import generate
from deltatune.model.load import load_causal_lm, load_frozen_base
from deltatune.runtime.precision import pick_device


@dataclass
class Predictions:
    """Greedy task outputs of one model on the test records, in the records' order."""
    prompts: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    scored: list[float] = field(default_factory=list)  # 1.0 where the output passed the run's metric

    @classmethod
    def from_eval(cls, result: dict) -> "Predictions":
        p = result.get("predictions") or []
        return cls([x["prompt"] for x in p], [x["reference"] for x in p], [x["output"] for x in p],
                   [float(x["hit"]) for x in p])

    def hits(self) -> list[float]:
        return self.scored




def measure(base, tuned, tokenizer, *, val_examples, base_predictions: Predictions | None,
            tuned_predictions: Predictions | None, metric: str, options: ReportOptions, device,
            probe_set=None) -> dict:
    """Every base-vs-tuned number of the report (training excepted), as the delta.json dict."""
    seconds = {}
    with timed(seconds, "task"):
        report: dict = {"task": task_measures(base, tuned, tokenizer, val_examples, base_predictions,
                                              tuned_predictions, metric, options, device)}
    report["forgetting"] = forgetting_measures(base, tuned, tokenizer, options, device, seconds, probe_set)
    with timed(seconds, "weights"):
        report["weights"] = weight_delta(base, tuned)
    report["side_by_side"] = []
    if base_predictions and tuned_predictions:
        report["side_by_side"] = [{"prompt": p, "reference": r, "base": b, "tuned": o} for p, r, b, o in zip(
            tuned_predictions.prompts, tuned_predictions.references, base_predictions.outputs,
            tuned_predictions.outputs)][: options.side_by_side]
    report["seconds"] = seconds
    return report


def task_measures(base, tuned, tokenizer, val_examples, base_predictions: Predictions | None,
                  tuned_predictions: Predictions | None, metric: str, options: ReportOptions, device) -> dict:
    """The task gain: validation loss (token-weighted) and the test metric, with paired CIs."""
    task: dict = {"validation": None, "metric": None}
    if val_examples:
        stats = delta.paired_pass(base, tuned, val_examples, tokenizer.pad_token_id, device, options.batch_size)
        # Token-weighted: the mean loss over all label tokens, resampled by example.
        loss = delta.paired_gain(stats.nll_base, stats.nll_tuned, stats.label_tokens, higher_is_better=False,
                                 seed=options.seed)
        s = stats.summary()
        task["validation"] = {"loss": loss, "base_perplexity": s["base_perplexity"],
                              "tuned_perplexity": s["tuned_perplexity"], "kl_per_token": s["kl_per_token"],
                              "tokens": s["tokens"]}
    if base_predictions and tuned_predictions and base_predictions.references:
        task["metric"] = {"name": metric, **delta.paired_gain(
            base_predictions.hits(), tuned_predictions.hits(), seed=options.seed)}
    return task


def forgetting_measures(base, tuned, tokenizer, options: ReportOptions, device, seconds: dict,
                        probe_set=None) -> dict:
    """General-text perplexity and KL, KL on the base model's own samples, fact recall; each
    measure's time goes into `seconds`."""
    pad = tokenizer.pad_token_id
    forgetting: dict = {}
    with timed(seconds, "general_text"):
        texts, source = delta.general_texts(options.general_text_file, seed=options.seed)
        stats = delta.paired_pass(base, tuned, delta.text_examples(tokenizer, texts), pad, device, options.batch_size)
        s = stats.summary()
        forgetting["general_text"] = {
            "source": source, "passages": s["sequences"], "tokens": s["tokens"],
            "base_perplexity": s["base_perplexity"], "tuned_perplexity": s["tuned_perplexity"],
            "perplexity_change": s["tuned_perplexity"] / s["base_perplexity"] - 1.0, "kl_per_token": s["kl_per_token"]}

    with timed(seconds, "base_samples"):
        forgetting["base_samples"] = None
        if options.kl_samples:
            samples = delta.sample_from_base(base, tokenizer, options.kl_samples, seed=options.seed, device=device)
            stats = delta.paired_pass(base, tuned, samples, pad, device, options.batch_size)
            forgetting["base_samples"] = {"samples": len(samples), "tokens": int(stats.kl_tokens.sum()),
                                          "kl_per_token": stats.summary()["kl_per_token"]}

    with timed(seconds, "fact_recall"):
        items, sources = probe_set or load_probe_sets(options.probe_files)
        with computing(base) as model:
            base_ok, base_out = probes.score(model, tokenizer, items, device)
        tuned_ok, tuned_out = probes.score(tuned, tokenizer, items, device)
        forgetting["fact_recall"] = {
            "items": len(items), "base_correct": sum(base_ok), "tuned_correct": sum(tuned_ok),
            "base_accuracy": sum(base_ok) / len(items), "tuned_accuracy": sum(tuned_ok) / len(items),
            "retention": probes.retention(base_ok, tuned_ok), "sources": sources,
            "lost": [{"prompt": p.prompt, "answer": p.answer, "base": b, "tuned": o}
                     for p, ok_b, ok_t, b, o in zip(items, base_ok, tuned_ok, base_out, tuned_out)
                     if ok_b and not ok_t]}

    if options.benchmarks:  # standard benchmarks through lm-evaluation-harness, base and tuned alike
        with timed(seconds, "benchmarks"):
            runs = []
            for side in (base, tuned):
                with computing(side) as model:
                    runs.append(benchmarks.score(model, tokenizer, options.benchmarks, limit=options.benchmark_limit,
                                                 tasks_dir=options.benchmark_tasks_dir, seed=options.seed,
                                                 batch_size=options.batch_size))
            forgetting["benchmarks"] = benchmarks.section(*runs, seed=options.seed)
    return forgetting




# --- writing -------------------------------------------------------------------------------











def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(measure, base, tuned, change) rows: the compact table the CLI prints and report.md opens with."""
    rows = []
    task = report["task"]
    if task.get("metric"):
        m = task["metric"]
        sig = "significant" if m["significant"] else "not significant"
        rows.append((f"{m['name']} (test, n={m['examples']})", pct(m["base"]), pct(m["tuned"]),
                     f"{100 * m['gain']:+.1f} pt [{100 * m['gain_ci'][0]:+.1f}, {100 * m['gain_ci'][1]:+.1f}] {sig}"))
    if task.get("validation"):
        v = task["validation"]
        sig = "significant" if v["loss"]["significant"] else "not significant"
        rows.append(("validation loss", fmt(v["loss"]["base"]), fmt(v["loss"]["tuned"]),
                     f"{-v['loss']['gain']:+.4f} [{-v['loss']['gain_ci'][1]:+.4f}, "
                     f"{-v['loss']['gain_ci'][0]:+.4f}] {sig}"))
        rows.append(("KL(base‖tuned) on task text, /token", "", "", fmt(v["kl_per_token"])))
    return rows + forgetting_rows(report)


def forgetting_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """The summary rows every causal-LM report shares (SFT and preference): forgetting and weight change."""
    rows = []
    g = report["forgetting"]["general_text"]
    rows.append(("general-text perplexity", fmt(g["base_perplexity"]), fmt(g["tuned_perplexity"]),
                 f"{100 * g['perplexity_change']:+.1f}%"))
    rows.append(("KL(base‖tuned) on general text, /token", "", "", fmt(g["kl_per_token"])))
    if report["forgetting"].get("base_samples"):
        rows.append(("KL(base‖tuned) on base samples, /token", "", "",
                     fmt(report["forgetting"]["base_samples"]["kl_per_token"])))
    fr = report["forgetting"]["fact_recall"]
    rows.append((f"fact recall ({fr['items']} probes)", pct(fr["base_accuracy"]), pct(fr["tuned_accuracy"]),
                 f"retention {pct(fr['retention'])}"))
    rows += benchmark_rows(report["forgetting"].get("benchmarks") or {})
    w = report["weights"]
    top = w["top"][0] if w["top"] else "-"
    rows.append(("weights ‖ΔW‖/‖W‖ (all matrices)", "", "", f"{fmt(w['relative_norm'])}; most changed: {top}"))
    return rows








def _points(m: dict) -> str:
    sig = "significant" if m["significant"] else "not significant"
    return f"{100 * m['gain']:+.1f} pt [{100 * m['gain_ci'][0]:+.1f}, {100 * m['gain_ci'][1]:+.1f}] {sig}"


def benchmark_rows(bench: dict) -> list[tuple[str, str, str, str]]:
    """Summary rows: each benchmark's metric base → tuned (a skipped one says so)."""
    return [(f"{task} (lm-eval, skipped)", "", "", b["skipped"][:60]) if "skipped" in b else
            (f"{task} {b['name']} (lm-eval, n={b['examples']})", pct(b["base"]), pct(b["tuned"]), _points(b))
            for task, b in bench.items()]


def markdown(report: dict) -> str:
    lines = ["# Delta report: what fine-tuning changed", "",
             f"Base `{report['base_model']}` → tuned `{report['tuned_model']}` (deltatune delta schema "
             f"v{report['schema_version']}, {report['created']})", "", "## Summary", ""]
    lines += md_table(["measure", "base", "tuned", "change"], [list(r) for r in summary_rows(report)])
    lines += ["", "Intervals are 95 % paired bootstrap CIs over examples; *significant* means the interval of "
              "the change excludes 0.", "", "## Forgetting", ""]
    lines += forgetting_markdown(report)
    lines += side_by_side_markdown(report["side_by_side"])
    lines += training_markdown(report.get("training"))
    lines += ["", "Measurement time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def side_by_side_markdown(rows: list[dict], reference: str = "reference") -> list[str]:
    """report.md's held-out prompts with base and tuned answers (`reference`: what the expected answer is called)."""
    if not rows:
        return []
    lines = ["", "## Side by side (held-out prompts, greedy)", ""]
    for x in rows:
        lines += [f"**Prompt:** {x['prompt']}", "", f"- {reference}: `{x['reference']}`", f"- base: `{x['base']}`",
                  f"- tuned: `{x['tuned']}`", ""]
    return lines


def forgetting_markdown(report: dict) -> list[str]:
    """report.md's forgetting and weight-change sections, shared by the causal-LM reports."""
    lines = []
    g = report["forgetting"]["general_text"]
    lines.append(f"- General text: {g['passages']} passages, {g['tokens']} tokens from {g['source']}.")
    if report["forgetting"].get("base_samples"):
        b = report["forgetting"]["base_samples"]
        lines.append(f"- KL on base samples: {b['samples']} continuations sampled from the base model "
                     f"(temperature 1), {b['tokens']} tokens.")
    fr = report["forgetting"]["fact_recall"]
    lines.append(f"- Fact recall: {fr['base_correct']}/{fr['items']} right before, {fr['tuned_correct']}/{fr['items']} "
                 f"after; retention {pct(fr['retention'])} ({', '.join(fr['sources'])}).")
    if fr["lost"]:
        lines += ["", "Facts the tuned model lost:", ""]
        lines += md_table(["prompt", "expected", "base", "tuned"],
                           [[x["prompt"], x["answer"], x["base"].strip(), x["tuned"].strip()] for x in fr["lost"][:10]])
    bench = report["forgetting"].get("benchmarks") or {}
    if bench:
        lines += ["", "Benchmarks (lm-evaluation-harness, the same samples scored on base and tuned):", ""]
        lines += md_table(["task", "metric", "base", "tuned", "change [95% CI]", "samples"],
                          [[task, "skipped", "-", "-", b["skipped"], "-"] if "skipped" in b else
                           [task, b["name"], pct(b["base"]), pct(b["tuned"]), _points(b), b["examples"]]
                           for task, b in bench.items()])
    return lines + weight_markdown(report["weights"])
















def build(base, tuned, tokenizer, *, base_model: str, tuned_model: str, val_examples, base_predictions,
          tuned_predictions, metric: str, options: ReportOptions, device, metrics_path=None, fit=None) -> dict:
    report = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "task_type": "causal_lm",
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "base_model": display_name(base_model), "tuned_model": display_name(tuned_model)}
    report.update(measure(base, tuned, tokenizer, val_examples=val_examples, base_predictions=base_predictions,
                          tuned_predictions=tuned_predictions, metric=metric, options=options, device=device))
    report["training"] = training_section(metrics_path, fit)
    return report


def after_training(model_args, options: ReportOptions, metric: str, tuned, tokenizer, val_examples, before: dict,
                   after: dict, fit, out_dir: Path, device) -> dict:
    """The end of every `deltatune train`: compare the tuned model with the base.

    `model_args`: the run's ModelArgs (which base, loaded how). An adapter run's base is the tuned
    model with its adapters off (no second copy; its adapters give ΔW); any other method's base is
    reloaded from its folder, its block weights in the run's torch_dtype.
    """
    print("measuring what fine-tuning changed (delta report)...", flush=True)
    start = time.perf_counter()
    base = base_side(model_args, tuned, device)
    report = build(base, tuned, tokenizer, base_model=model_args.name, tuned_model=str(out_dir / "final"),
                   val_examples=val_examples, base_predictions=Predictions.from_eval(before),
                   tuned_predictions=Predictions.from_eval(after), metric=metric,
                   options=options, device=device, metrics_path=out_dir / "metrics.jsonl", fit=fit)
    report["seconds"]["total"] = time.perf_counter() - start
    del base
    publish(out_dir, report, markdown, summary_rows(report), took=f" ({report['seconds']['total']:.0f} s)")
    return report


def base_side(model_args, tuned, device):
    """What the report compares the tuned model with: AdaptersOff(tuned) for an adapter run, else the
    base reloaded (frozen, in eval mode on the device)."""
    if hasattr(tuned, "disable_adapter"):  # a peft model
        return AdaptersOff(tuned)
    return load_frozen_base(model_args).to(device).eval()


def load_pair(base_name: str, tuned_name: str, settings: CompareSettings):
    """(base, tuned, the tuned model's tokenizer, device) for `compare`, both in eval mode on the device;
    two vocabularies are refused (their next-token distributions cannot be compared)."""
    device = pick_device()
    opts = dict(allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code)
    base, _ = load_causal_lm(base_name, **opts)
    tuned, tokenizer = load_causal_lm(tuned_name, **opts)
    if base.get_output_embeddings().weight.shape != tuned.get_output_embeddings().weight.shape:
        raise UserError(f"{base_name} and {tuned_name} have different vocabularies, so their next-token "
                        "distributions cannot be compared (compare a model with its own fine-tune)")
    return base.to(device).eval(), tuned.to(device).eval(), tokenizer, device


def compare(base_name: str, tuned_name: str, records: list[Record], data_file: str, out_dir: Path,
            settings: CompareSettings) -> dict:
    """`deltatune compare` on conversations: the training report's measures for any pair of causal LMs."""
    check, options = settings.check, settings.options
    records = records[:settings.max_examples or 64]
    for f in options.probe_files:
        probes.load_probe_file(f)  # bad probe files fail before the models load
    base, tuned, tokenizer, device = load_pair(base_name, tuned_name, settings)
    examples, _ = build_sft_examples(records, tokenizer, max_seq_length=settings.max_seq_length, name=str(data_file))
    base_pred = tuned_pred = None
    if check.metric != "none":
        prompts = [r.messages[-2]["content"] if len(r.messages) > 1 else "" for r in records]
        refs = references(records)
        outs = [generate(m, tokenizer, [r.messages for r in records], max_new_tokens=settings.max_new_tokens,
                         batch_size=options.batch_size, device=device) for m in (base, tuned)]
        base_pred, tuned_pred = (Predictions(prompts, refs, out, check.hits(out, refs)) for out in outs)
    start = time.perf_counter()
    metrics_path = Path(tuned_name).parent / "metrics.jsonl"  # a deltatune run's final/ sits next to its log
    report = build(base, tuned, tokenizer, base_model=base_name, tuned_model=tuned_name, val_examples=examples,
                   base_predictions=base_pred, tuned_predictions=tuned_pred, metric=check.metric, options=options,
                   device=device, metrics_path=metrics_path if metrics_path.is_file() else None)
    report["seconds"]["total"] = time.perf_counter() - start
    publish(out_dir, report, markdown, summary_rows(report))
    return report


def frontier_point(name: str, settings: dict, report: dict) -> dict:
    """A run's point on the frontier: gain (test metric, else validation loss) against the
    general-text KL, with the forgetting budget's measures."""
    metric = report["task"].get("metric")
    gain = delta.gain_point(metric, f"{metric['name']} gain" if metric else "", report["task"].get("validation"))
    return {"name": name, "settings": settings, **gain, **forgetting_point(report), "task_type": "causal_lm"}


def forgetting_point(report: dict) -> dict:
    """A causal-LM run's forgetting on the frontier: general-text KL (the axis), perplexity change, KL on base
    samples, fact retention, weight change."""
    g = report["forgetting"]["general_text"]
    samples = report["forgetting"].get("base_samples") or {}
    return {"forgetting": g["kl_per_token"], "perplexity_change": g["perplexity_change"],
            "kl_base_samples": samples.get("kl_per_token"),
            "fact_retention": report["forgetting"]["fact_recall"]["retention"],
            "weight_change": report["weights"]["relative_norm"]}


def frontier_measures(e: dict) -> list[str]:
    return ["-" if e["perplexity_change"] is None else f"{100 * e['perplexity_change']:+.1f}%",
            "-" if e["fact_retention"] is None else f"{100 * e['fact_retention']:.0f}%"]


KIND = ReportKind("causal_lm", compare, frontier_point,
                  ("run", "gain [95% CI]", "KL general /tok", "general ppl", "fact retention", "‖ΔW‖/‖W‖",
                   "within budget", ""),
                  frontier_measures, "mean per-token KL(base‖tuned) on general text")
