"""The delta report: run the measurements of `delta.py` and write report.md, report.html, delta.json.

`delta.json` schema (`"schema": "deltatune.delta"`, `"schema_version": 2`); every number is a
float/int, NaN is written as null. Version 2 added `task_type` and has two variants:
`"causal_lm"` (below; otherwise the v1 shape) and `"classification"` (documented in
`delta_classify.py`). A v1 file has no `task_type` and is a causal-LM report.

    task_type: "causal_lm"
    base_model, tuned_model (local paths resolved), created (UTC ISO time)
    task.validation.loss: {base, base_ci, tuned, tuned_ci, gain, gain_ci, significant, examples}
        gain = base loss − tuned loss (positive: tuned is better), 95 % paired bootstrap CIs
    task.validation: base_perplexity, tuned_perplexity, kl_per_token (KL(base‖tuned) on the
        validation conversations, every position), tokens
    task.metric: {name, base, base_ci, tuned, tuned_ci, gain, gain_ci, significant, examples} or null
    forgetting.general_text: {source, passages, tokens, base_perplexity, tuned_perplexity,
        perplexity_change (relative, 0.05 = +5 %), kl_per_token}
    forgetting.base_samples: {samples, tokens, kl_per_token}: Monte-Carlo KL(base‖tuned) on
        continuations sampled from the base model
    forgetting.fact_recall: {items, base_correct, tuned_correct, base_accuracy, tuned_accuracy,
        retention, lost: [{prompt, answer, base, tuned}], sources}
    weights: {relative_norm, changed_matrices, matrices: [{name, layer, module_type, shape,
        delta_norm, base_norm, relative_norm, effective_rank, intruders, lora}],
        by_layer: [...], by_module_type: [...], top: [names]}
    side_by_side: [{prompt, reference, base, tuned}]
    training: {steps, epochs, wall_seconds, tokens_per_second, train_loss, curves: {loss:
        [[step, value]], eval_loss: [...], learning_rate: [...]}} or null
    seconds: time each measurement took
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deltatune import delta, probes
from deltatune.evaluate import Check

SCHEMA = "deltatune.delta"
SCHEMA_VERSION = 2  # 2: task_type, and the classification variant


@dataclass(frozen=True)
class ReportOptions:
    general_text_file: str | None = None
    probe_files: tuple[str, ...] = ()
    side_by_side: int = 8
    kl_samples: int = 8
    batch_size: int = 8
    seed: int = 0


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


def load_probe_sets(files) -> tuple[list[probes.Probe], list[str]]:
    items, sources = probes.builtin_probes(), [f"builtin ({len(probes.BUILTIN_FACTS)} items)"]
    for f in files:
        extra = probes.load_probe_file(f)
        items += extra
        sources.append(f"{f} ({len(extra)} items)")
    return items, sources


def measure(base, tuned, tokenizer, *, val_examples, base_predictions: Predictions | None,
            tuned_predictions: Predictions | None, metric: str, options: ReportOptions, device,
            probe_set=None) -> dict:
    """Every base-vs-tuned number of the report (training excepted), as the delta.json dict."""
    seconds = {}
    pad = tokenizer.pad_token_id
    report: dict = {"task": {"validation": None, "metric": None}, "forgetting": {}}

    t = time.perf_counter()
    if val_examples:
        stats = delta.paired_pass(base, tuned, val_examples, pad, device, options.batch_size)
        # Token-weighted: the mean loss over all label tokens, resampled by example.
        loss = delta.paired_gain(stats.nll_base, stats.nll_tuned, stats.label_tokens, higher_is_better=False,
                                 seed=options.seed)
        s = stats.summary()
        report["task"]["validation"] = {"loss": loss, "base_perplexity": s["base_perplexity"],
                                        "tuned_perplexity": s["tuned_perplexity"],
                                        "kl_per_token": s["kl_per_token"], "tokens": s["tokens"]}
    if base_predictions and tuned_predictions and base_predictions.references:
        report["task"]["metric"] = {"name": metric, **delta.paired_gain(
            base_predictions.hits(), tuned_predictions.hits(), seed=options.seed)}
    seconds["task"] = time.perf_counter() - t

    t = time.perf_counter()
    texts, source = delta.general_texts(options.general_text_file, seed=options.seed)
    stats = delta.paired_pass(base, tuned, delta.text_examples(tokenizer, texts), pad, device, options.batch_size)
    s = stats.summary()
    report["forgetting"]["general_text"] = {
        "source": source, "passages": s["sequences"], "tokens": s["tokens"],
        "base_perplexity": s["base_perplexity"], "tuned_perplexity": s["tuned_perplexity"],
        "perplexity_change": s["tuned_perplexity"] / s["base_perplexity"] - 1.0, "kl_per_token": s["kl_per_token"]}
    seconds["general_text"] = time.perf_counter() - t

    t = time.perf_counter()
    report["forgetting"]["base_samples"] = None
    if options.kl_samples:
        samples = delta.sample_from_base(base, tokenizer, options.kl_samples, seed=options.seed, device=device)
        stats = delta.paired_pass(base, tuned, samples, pad, device, options.batch_size)
        report["forgetting"]["base_samples"] = {"samples": len(samples), "tokens": int(stats.kl_tokens.sum()),
                                                "kl_per_token": stats.summary()["kl_per_token"]}
    seconds["base_samples"] = time.perf_counter() - t

    t = time.perf_counter()
    items, sources = probe_set or load_probe_sets(options.probe_files)
    base_ok, base_out = probes.score(base, tokenizer, items, device)
    tuned_ok, tuned_out = probes.score(tuned, tokenizer, items, device)
    report["forgetting"]["fact_recall"] = {
        "items": len(items), "base_correct": sum(base_ok), "tuned_correct": sum(tuned_ok),
        "base_accuracy": sum(base_ok) / len(items), "tuned_accuracy": sum(tuned_ok) / len(items),
        "retention": probes.retention(base_ok, tuned_ok), "sources": sources,
        "lost": [{"prompt": p.prompt, "answer": p.answer, "base": b, "tuned": o}
                 for p, ok_b, ok_t, b, o in zip(items, base_ok, tuned_ok, base_out, tuned_out) if ok_b and not ok_t]}
    seconds["fact_recall"] = time.perf_counter() - t

    t = time.perf_counter()
    report["weights"] = delta.weight_delta(base, tuned)
    seconds["weights"] = time.perf_counter() - t

    report["side_by_side"] = []
    if base_predictions and tuned_predictions:
        report["side_by_side"] = [{"prompt": p, "reference": r, "base": b, "tuned": o} for p, r, b, o in zip(
            tuned_predictions.prompts, tuned_predictions.references, base_predictions.outputs,
            tuned_predictions.outputs)][: options.side_by_side]
    report["seconds"] = seconds
    return report


def training_section(metrics_path: Path | None, fit=None) -> dict | None:
    """Curves from metrics.jsonl; totals from the fit result (or the log's last entries)."""
    if metrics_path is None or not Path(metrics_path).is_file():
        return None
    curves = {"loss": [], "eval_loss": [], "learning_rate": []}
    tokens_per_second = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in curves:
            if isinstance(rec.get(key), (int, float)) and "event" not in rec:
                curves[key].append([rec.get("step", 0), rec[key]])
        if isinstance(rec.get("tokens_per_second"), (int, float)):
            tokens_per_second.append(rec["tokens_per_second"])
    section = {"curves": curves}
    if fit is not None:
        section.update(steps=fit.steps, epochs=fit.epochs, wall_seconds=fit.wall_seconds,
                       tokens_per_second=fit.tokens_per_second, train_loss=fit.train_loss)
    else:
        section.update(steps=curves["loss"][-1][0] if curves["loss"] else 0,
                       tokens_per_second=float(np.mean(tokens_per_second)) if tokens_per_second else None,
                       train_loss=curves["loss"][-1][1] if curves["loss"] else None)
    return section


# --- writing -------------------------------------------------------------------------------

def _clean(obj):
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _pct(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _ci(d: dict, key: str, scale: float = 1.0, digits: int = 4) -> str:
    lo, hi = d[f"{key}_ci"]
    return f"{_f(d[key] * scale, digits)} [{_f(lo * scale, digits)}, {_f(hi * scale, digits)}]"


def display_name(name: str) -> str:
    """A model as the report shows it: local paths resolved (no `configs/../runs`), names as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(measure, base, tuned, change) rows: the compact table the CLI prints and report.md opens with."""
    rows = []
    task = report["task"]
    if task.get("metric"):
        m = task["metric"]
        sig = "significant" if m["significant"] else "not significant"
        rows.append((f"{m['name']} (test, n={m['examples']})", _pct(m["base"]), _pct(m["tuned"]),
                     f"{100 * m['gain']:+.1f} pt [{100 * m['gain_ci'][0]:+.1f}, {100 * m['gain_ci'][1]:+.1f}] {sig}"))
    if task.get("validation"):
        v = task["validation"]
        sig = "significant" if v["loss"]["significant"] else "not significant"
        rows.append(("validation loss", _f(v["loss"]["base"]), _f(v["loss"]["tuned"]),
                     f"{-v['loss']['gain']:+.4f} [{-v['loss']['gain_ci'][1]:+.4f}, {-v['loss']['gain_ci'][0]:+.4f}] {sig}"))
        rows.append(("KL(base‖tuned) on task text, /token", "", "", _f(v["kl_per_token"])))
    g = report["forgetting"]["general_text"]
    rows.append(("general-text perplexity", _f(g["base_perplexity"]), _f(g["tuned_perplexity"]),
                 f"{100 * g['perplexity_change']:+.1f}%"))
    rows.append(("KL(base‖tuned) on general text, /token", "", "", _f(g["kl_per_token"])))
    if report["forgetting"].get("base_samples"):
        rows.append(("KL(base‖tuned) on base samples, /token", "", "",
                     _f(report["forgetting"]["base_samples"]["kl_per_token"])))
    fr = report["forgetting"]["fact_recall"]
    rows.append((f"fact recall ({fr['items']} probes)", _pct(fr["base_accuracy"]), _pct(fr["tuned_accuracy"]),
                 f"retention {_pct(fr['retention'])}"))
    w = report["weights"]
    top = w["top"][0] if w["top"] else "-"
    rows.append(("weights ‖ΔW‖/‖W‖ (all matrices)", "", "", f"{_f(w['relative_norm'])}; most changed: {top}"))
    return rows


def print_summary(report: dict, title: str = "what fine-tuning changed (base → tuned)", rows=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("measure", "base", "tuned", "change"):
        table.add_column(col, justify="left" if col in ("measure", "change") else "right")
    for row in summary_rows(report) if rows is None else rows:
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(report: dict) -> dict[str, str]:
    """Base64 PNGs: training curves, change per layer, change per module type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    training = report.get("training")
    if training and training["curves"]["loss"]:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
        for key, label in (("loss", "train loss"), ("eval_loss", "validation loss")):
            pts = training["curves"][key]
            if pts:
                ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key == "eval_loss" else None,
                         label=label)
        ax1.set_xlabel("step"); ax1.set_ylabel("loss"); ax1.legend(); ax1.grid(alpha=0.3)
        lr = training["curves"]["learning_rate"]
        ax2.plot([p[0] for p in lr], [p[1] for p in lr], color="tab:green")
        ax2.set_xlabel("step"); ax2.set_ylabel("learning rate"); ax2.grid(alpha=0.3)
        out["training"] = _png(fig)
    layers = [r for r in report["weights"]["by_layer"] if r["layer"] is not None]
    if layers:
        fig, ax = plt.subplots(figsize=(10, 3))
        ax.bar([r["layer"] for r in layers], [r["relative_norm"] for r in layers])
        ax.set_xlabel("layer"); ax.set_ylabel("‖ΔW‖/‖W‖"); ax.set_title("weight change per layer")
        out["layers"] = _png(fig)
    types = report["weights"]["by_module_type"]
    if types:
        fig, ax = plt.subplots(figsize=(10, 3))
        ax.bar([str(r["module_type"]) for r in types], [r["relative_norm"] for r in types], color="tab:orange")
        ax.set_ylabel("‖ΔW‖/‖W‖"); ax.set_title("weight change per module type")
        ax.tick_params(axis="x", rotation=30)
        out["module_types"] = _png(fig)
    return out


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    esc = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]


def markdown(report: dict) -> str:
    lines = ["# Delta report: what fine-tuning changed", "",
             f"Base `{report['base_model']}` → tuned `{report['tuned_model']}` (deltatune delta schema "
             f"v{report['schema_version']}, {report['created']})", "", "## Summary", ""]
    lines += _md_table(["measure", "base", "tuned", "change"], [list(r) for r in summary_rows(report)])
    lines += ["", "Intervals are 95 % paired bootstrap CIs over examples; *significant* means the interval of "
              "the change excludes 0.", "", "## Forgetting", ""]
    g = report["forgetting"]["general_text"]
    lines.append(f"- General text: {g['passages']} passages, {g['tokens']} tokens from {g['source']}.")
    if report["forgetting"].get("base_samples"):
        b = report["forgetting"]["base_samples"]
        lines.append(f"- KL on base samples: {b['samples']} continuations sampled from the base model "
                     f"(temperature 1), {b['tokens']} tokens.")
    fr = report["forgetting"]["fact_recall"]
    lines.append(f"- Fact recall: {fr['base_correct']}/{fr['items']} right before, {fr['tuned_correct']}/{fr['items']} "
                 f"after; retention {_pct(fr['retention'])} ({', '.join(fr['sources'])}).")
    if fr["lost"]:
        lines += ["", "Facts the tuned model lost:", ""]
        lines += _md_table(["prompt", "expected", "base", "tuned"],
                           [[x["prompt"], x["answer"], x["base"].strip(), x["tuned"].strip()] for x in fr["lost"][:10]])
    lines += weight_markdown(report["weights"])
    if report["side_by_side"]:
        lines += ["", "## Side by side (held-out prompts, greedy)", ""]
        for x in report["side_by_side"]:
            lines += [f"**Prompt:** {x['prompt']}", "", f"- reference: `{x['reference']}`",
                      f"- base: `{x['base']}`", f"- tuned: `{x['tuned']}`", ""]
    lines += training_markdown(report.get("training"))
    lines += ["", "Measurement time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def weight_markdown(w: dict) -> list[str]:
    by_name = {m["name"]: m for m in w["matrices"]}
    lines = ["", "## Weight change", "",
              f"{w['changed_matrices']} of {len(w['matrices'])} weight matrices changed; overall ‖ΔW‖_F/‖W‖_F = "
              f"{_f(w['relative_norm'])}. Effective rank: smallest k holding 90 % of ΔW's squared singular values. "
              f"Intruders: top-{delta.INTRUDER_TOP_K} singular vectors of W_tuned with |cos| < {delta.INTRUDER_COSINE} "
              f"to all top-{delta.INTRUDER_BASE_K} of W_base.", "", "Most changed matrices:", ""]
    lines += _md_table(["matrix", "shape", "‖ΔW‖/‖W‖", "effective rank", "intruders"],
                       [[n, "×".join(map(str, by_name[n]["shape"])), _f(by_name[n]["relative_norm"]),
                         by_name[n]["effective_rank"], by_name[n]["intruders"]] for n in w["top"]])
    lines += ["", "Per module type:", ""]
    lines += _md_table(["module type", "matrices", "‖ΔW‖/‖W‖", "mean effective rank", "intruders"],
                       [[r["module_type"], r["matrices"], _f(r["relative_norm"]), _f(r["mean_effective_rank"], 3),
                         r["intruders"]] for r in w["by_module_type"]])
    lines += ["", "Per layer:", ""]
    lines += _md_table(["layer", "matrices", "‖ΔW‖/‖W‖", "mean effective rank", "intruders"],
                       [["-" if r["layer"] is None else r["layer"], r["matrices"], _f(r["relative_norm"]),
                         _f(r["mean_effective_rank"], 3), r["intruders"]] for r in w["by_layer"]])
    return lines


def training_markdown(tr: dict | None) -> list[str]:
    lines = []
    if tr:
        lines += ["", "## Training", "",
                  f"- steps: {tr.get('steps')}, train loss at the end: {_f(tr.get('train_loss'))}",
                  f"- wall time: {_f(tr.get('wall_seconds'), 3)} s, {_f(tr.get('tokens_per_second'), 3)} trained tokens/s"]
        if tr["curves"]["eval_loss"]:
            lines.append("- validation loss by step: " +
                         ", ".join(f"{s}: {v:.4f}" for s, v in tr["curves"]["eval_loss"]))
    return lines


def _markdown_to_html(md: str) -> str:
    """Just enough markdown (headings, tables, lists, paragraphs, code, bold) for our own report."""
    import re

    out, table = [], []

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"`([^`]*)`", r"<code>\1</code>", s)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)

    def flush():
        if table:
            head, *body = [[c.strip() for c in re.split(r"(?<!\\)\|", r.strip()[1:-1])] for r in table if "---|" not in r]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{inline(c.replace(chr(92) + '|', '|'))}</td>" for c in r) + "</tr>"
                               for r in body) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


HTML_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
              "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
              "font-size:14px;text-align:left}th{background:#f3f3f3}code{background:#f5f5f5;padding:0 3px}"
              "img{max-width:100%}")


def html_page(title: str, md: str, images: dict[str, str]) -> str:
    body = _markdown_to_html(md)
    figs = "".join(f'<h2>{html.escape(name.replace("_", " "))}</h2><img alt="{name}" src="data:image/png;base64,{data}">'
                   for name, data in images.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head><body>{body}{figs}</body></html>\n")


def files_text(paths: dict[str, Path]) -> str:
    """`/abs/dir/{report.md, report.html, delta.json}`: where the files went, resolved for display."""
    folder = {p.parent for p in paths.values()}
    names = ", ".join(p.name for p in paths.values())
    return f"{folder.pop().resolve()}/{{{names}}}" if len(folder) == 1 else ", ".join(str(p.resolve()) for p in paths.values())


def write(out_dir: Path, report: dict, render=None) -> dict[str, Path]:
    """report.md, report.html (self-contained) and delta.json in out_dir; `render`: report -> Markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _clean(report)
    md = (render or markdown)(report)
    paths = {"md": out_dir / "report.md", "html": out_dir / "report.html", "json": out_dir / "delta.json"}
    paths["md"].write_text(md, encoding="utf-8")
    paths["html"].write_text(html_page("deltatune delta report", md, plots(report)), encoding="utf-8")
    # delta.json last: its presence marks a finished run (sweeps skip such runs).
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(paths["json"])
    return paths


def build(base, tuned, tokenizer, *, base_model: str, tuned_model: str, val_examples, base_predictions,
          tuned_predictions, metric: str, options: ReportOptions, device, metrics_path=None, fit=None) -> dict:
    report = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "task_type": "causal_lm",
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "base_model": display_name(base_model), "tuned_model": display_name(tuned_model)}
    report.update(measure(base, tuned, tokenizer, val_examples=val_examples, base_predictions=base_predictions,
                          tuned_predictions=tuned_predictions, metric=metric, options=options, device=device))
    report["training"] = training_section(metrics_path, fit)
    return report


def options_from_config(cfg) -> ReportOptions:
    return ReportOptions(general_text_file=cfg.general_text_file, probe_files=tuple(cfg.probe_files),
                         side_by_side=cfg.side_by_side_prompts, kl_samples=cfg.kl_samples,
                         batch_size=cfg.per_device_eval_batch_size, seed=cfg.seed)


def after_training(cfg, tuned, tokenizer, val_examples, before: dict, after: dict, fit, out_dir: Path, device) -> dict:
    """The end of every `deltatune train`: compare the tuned model with a fresh copy of the base.

    The base is reloaded from its folder (under a second for a cached model) rather than kept
    in memory during training; for LoRA the tuned model's own adapters give ΔW.
    """
    from deltatune.model import load_causal_lm

    print("measuring what fine-tuning changed (delta report)...", flush=True)
    start = time.perf_counter()
    base, _ = load_causal_lm(cfg.model, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    base.to(device).eval()
    report = build(base, tuned, tokenizer, base_model=cfg.model, tuned_model=str(out_dir / "final"),
                   val_examples=val_examples, base_predictions=Predictions.from_eval(before),
                   tuned_predictions=Predictions.from_eval(after), metric=cfg.metric,
                   options=options_from_config(cfg), device=device, metrics_path=out_dir / "metrics.jsonl", fit=fit)
    report["seconds"]["total"] = time.perf_counter() - start
    paths = write(out_dir, report)
    del base
    print_summary(report)
    print(f"delta report: {files_text(paths)} ({report['seconds']['total']:.0f} s)")
    return report


def compare(base_name: str, tuned_name: str, data_file: str, out_dir: Path, *, fmt: str = "auto",
            check: Check = Check(), max_examples: int | None = 64, max_seq_length: int = 1024,
            max_new_tokens: int = 64, options: ReportOptions = ReportOptions(), allow_pickle: bool = False,
            trust_remote_code: bool = False) -> dict:
    """`deltatune compare`: the same report for any pair of models on a data file (classifiers included)."""
    from deltatune.data import build_sft_examples
    from deltatune.errors import UserError
    from deltatune.evaluate import generate, references
    from deltatune.formats import CHAT_FORMATS, load_records
    from deltatune.model import load_causal_lm
    from deltatune.pipeline import pick_device

    records, fmt = load_records(data_file, fmt)
    if fmt == "classification":  # two classifiers: accuracy, macro-F1 and representation drift instead
        from deltatune import delta_classify

        return delta_classify.compare(base_name, tuned_name, records, data_file, out_dir, options=options,
                                      max_examples=max_examples, max_seq_length=max_seq_length,
                                      allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if fmt not in CHAT_FORMATS:
        raise UserError(f"{data_file}: format '{fmt}' has no conversations to compare the models on")
    records = records[:max_examples or 64]
    for f in options.probe_files:
        probes.load_probe_file(f)  # bad probe files fail before the models load
    device = pick_device()
    base, _ = load_causal_lm(base_name, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    tuned, tokenizer = load_causal_lm(tuned_name, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if base.get_output_embeddings().weight.shape != tuned.get_output_embeddings().weight.shape:
        raise UserError(f"{base_name} and {tuned_name} have different vocabularies, so their next-token "
                        "distributions cannot be compared (compare a model with its own fine-tune)")
    base.to(device).eval()
    tuned.to(device).eval()
    examples, _ = build_sft_examples(records, tokenizer, max_seq_length=max_seq_length, name=str(data_file))
    base_pred = tuned_pred = None
    if check.metric != "none":
        prompts = [r.messages[-2]["content"] if len(r.messages) > 1 else "" for r in records]
        refs = references(records)
        outs = [generate(m, tokenizer, [r.messages for r in records], max_new_tokens=max_new_tokens,
                         batch_size=options.batch_size, device=device) for m in (base, tuned)]
        base_pred, tuned_pred = (Predictions(prompts, refs, out, check.hits(out, refs)) for out in outs)
    start = time.perf_counter()
    metrics_path = Path(tuned_name).parent / "metrics.jsonl"  # a deltatune run's final/ sits next to its log
    report = build(base, tuned, tokenizer, base_model=base_name, tuned_model=tuned_name, val_examples=examples,
                   base_predictions=base_pred, tuned_predictions=tuned_pred, metric=check.metric, options=options,
                   device=device, metrics_path=metrics_path if metrics_path.is_file() else None)
    report["seconds"]["total"] = time.perf_counter() - start
    paths = write(out_dir, report)
    print_summary(report)
    print(f"delta report: {files_text(paths)}")
    return report


def check_inputs(cfg) -> None:
    """Read the report's own inputs before training, so a bad probe or corpus file fails in seconds."""
    if cfg.delta_report:
        load_probe_sets(cfg.probe_files)
        delta.general_texts(cfg.general_text_file, seed=cfg.seed)
