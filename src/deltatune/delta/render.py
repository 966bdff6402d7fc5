"""Writing a delta report: report.md, report.html (self-contained, plots inline) and delta.json.

Each report kind (causal LM, classifier, preference) measures its own numbers and hands them here as one
dict; this module formats numbers (`fmt`, `pct`, `ci`), tables, plots and pages, and writes
the three files. delta.json is written last, atomically: its presence marks a finished run.

`delta.json` schema (`"schema": "deltatune.delta"`, `"schema_version": 2`); every number is a
float/int, NaN is written as null. Version 2 added `task_type` and has two variants:
`"causal_lm"` (below; otherwise the v1 shape) and `"classification"` (below). A v1 file has no
`task_type` and is a causal-LM report.

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
    forgetting.benchmarks (with `forgetting_benchmarks`): {task: {name (the metric), base, base_ci,
        tuned, tuned_ci, gain, gain_ci, significant, examples} or {skipped: why}}
    weights: {relative_norm, changed_matrices, matrices: [{name, layer, module_type, shape,
        delta_norm, base_norm, relative_norm, effective_rank, intruders, lora}],
        by_layer: [...], by_module_type: [...], top: [names]}
    side_by_side: [{prompt, reference, base, tuned}]
    training: {steps, epochs, wall_seconds, tokens_per_second, train_loss, curves: {loss:
        [[step, value]], eval_loss: [...], learning_rate: [...]}} or null
    seconds: time each measurement took

`delta.json` for a classifier (`schema: deltatune.delta`, `schema_version: 2`,
`task_type: "classification"`); NaN is written as null:

    base_model, tuned_model (resolved paths), created, base_definition (text)
    task: {evaluated_on, labels,
        accuracy: {name, base, base_ci, tuned, tuned_ci, gain, gain_ci, significant, examples},
        macro_f1: {same keys}, metric: (the accuracy entry again, so scripts that read
        task.metric of causal reports find the headline metric),
        validation: {loss: {same keys; gain = base loss − tuned loss}, examples, evaluated_on} or null,
        base_matches_training_start: true/false (the reloaded base scores what the run's own
        base evaluation scored) or null outside training}
    forgetting.representation: {source, passages, sentences, tokens, pooling, mean_cosine,
        min_cosine, cka, drift (1 − cka)}
    weights: as in causal reports, backbone matrices only, plus new: [{name, shape, norm,
        init_norm, delta_norm (‖W − W_init‖), change_from_init (‖W − W_init‖/‖W_init‖, null
        for a zero-initialised bias)}]
    side_by_side: [{text, label, base, tuned}]
    training, seconds: as in causal reports

`task_type: "preference"` (a preference run, or `compare` on pairs) is documented in delta/preference.py.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from deltatune.delta import weights
from deltatune.files import inject_write_fault, writing

SCHEMA = "deltatune.delta"


SCHEMA_VERSION = 2  # 2: task_type, and the classification variant


def training_section(metrics_path: Path | None, fit=None) -> dict | None:
    """Curves from metrics.jsonl; totals from the fit result (or the log's last entries)."""
    if metrics_path is None or not Path(metrics_path).is_file():
        return None
    curves = {"loss": [], "eval_loss": [], "learning_rate": []}
    tokens_per_second, mix = [], None
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
        if rec.get("event") == "data_mix":
            mix = rec.get("sources")
    section = {"curves": curves}
    if mix:
        section["data_mix"] = mix
    if fit is not None:
        section.update(steps=fit.steps, epochs=fit.epochs, wall_seconds=fit.wall_seconds,
                       tokens_per_second=fit.tokens_per_second, train_loss=fit.train_loss)
    else:
        section.update(steps=curves["loss"][-1][0] if curves["loss"] else 0,
                       tokens_per_second=float(np.mean(tokens_per_second)) if tokens_per_second else None,
                       train_loss=curves["loss"][-1][1] if curves["loss"] else None)
    return section


def clean(obj):
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def fmt(x, digits: int = 4, fixed: bool = False) -> str:
    """The one number format of every report: `digits` significant digits (or decimals when
    `fixed`), "-" for a number that is missing or not finite, anything else as text."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if fixed else f"{x:.{digits}g}"
    return str(x)


def pct(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def ci(d: dict, key: str, scale: float = 1.0, digits: int = 4) -> str:
    lo, hi = d[f"{key}_ci"]
    return f"{fmt(d[key] * scale, digits)} [{fmt(lo * scale, digits)}, {fmt(hi * scale, digits)}]"


def display_name(name: str) -> str:
    """A model as the report shows it: local paths resolved (no `configs/../runs`), names as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def print_summary(rows: list[tuple[str, str, str, str]], title: str = "what fine-tuning changed (base → tuned)"
                  ) -> None:
    """The report's summary rows as a table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("measure", "base", "tuned", "change"):
        table.add_column(col, justify="left" if col in ("measure", "change") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt  # imported when a plot is drawn: matplotlib is slow to import

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def md_table(header: list[str], rows: list[list]) -> list[str]:
    esc = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]


def weight_markdown(w: dict) -> list[str]:
    by_name = {m["name"]: m for m in w["matrices"]}
    lines = ["", "## Weight change", "",
              f"{w['changed_matrices']} of {len(w['matrices'])} weight matrices changed; overall ‖ΔW‖_F/‖W‖_F = "
              f"{fmt(w['relative_norm'])}. Effective rank: smallest k holding 90 % of ΔW's squared singular values. "
              f"Intruders: top-{weights.INTRUDER_TOP_K} singular vectors of W_tuned with "
              f"|cos| < {weights.INTRUDER_COSINE} "
              f"to all top-{weights.INTRUDER_BASE_K} of W_base.", "", "Most changed matrices:", ""]
    lines += md_table(["matrix", "shape", "‖ΔW‖/‖W‖", "effective rank", "intruders"],
                       [[n, "×".join(map(str, by_name[n]["shape"])), fmt(by_name[n]["relative_norm"]),
                         by_name[n]["effective_rank"], by_name[n]["intruders"]] for n in w["top"]])
    lines += ["", "Per module type:", ""]
    lines += md_table(["module type", "matrices", "‖ΔW‖/‖W‖", "mean effective rank", "intruders"],
                       [[r["module_type"], r["matrices"], fmt(r["relative_norm"]), fmt(r["mean_effective_rank"], 3),
                         r["intruders"]] for r in w["by_module_type"]])
    lines += ["", "Per layer:", ""]
    lines += md_table(["layer", "matrices", "‖ΔW‖/‖W‖", "mean effective rank", "intruders"],
                       [["-" if r["layer"] is None else r["layer"], r["matrices"], fmt(r["relative_norm"]),
                         fmt(r["mean_effective_rank"], 3), r["intruders"]] for r in w["by_layer"]])
    return lines


def training_markdown(tr: dict | None) -> list[str]:
    lines = []
    if tr:
        lines += ["", "## Training", "",
                  f"- steps: {tr.get('steps')}, train loss at the end: {fmt(tr.get('train_loss'))}",
                  f"- wall time: {fmt(tr.get('wall_seconds'), 3)} s, "
                  f"{fmt(tr.get('tokens_per_second'), 3)} trained tokens/s"]
        if tr["curves"]["eval_loss"]:
            lines.append("- validation loss by step: " +
                         ", ".join(f"{s}: {v:.4f}" for s, v in tr["curves"]["eval_loss"]))
        lines += mix_markdown(tr.get("data_mix") or [])
    return lines


def mix_markdown(mix: list[dict]) -> list[str]:
    """The sources of a training mix: what each was weighted, drawn and gave of the tokens."""
    if not mix:
        return []
    return ["", "## Data mix", "", *md_table(
        ["source", "weight", "records", "drawn an epoch", "share of training tokens"],
        [[Path(m["source"]).name, f"{m['weight']:g}", m["available"], m["drawn"], pct(m["token_share"])]
         for m in mix])]


def _markdown_to_html(md: str) -> str:
    """Just enough markdown (headings, tables, lists, paragraphs, code, bold) for our own report."""
    out, table = [], []

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"`([^`]*)`", r"<code>\1</code>", s)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)

    def flush():
        if table:
            head, *body = [[c.strip() for c in re.split(r"(?<!\\)\|", r.strip()[1:-1])]
                           for r in table if "---|" not in r]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{inline(c.replace(chr(92) + '|', '|'))}</td>" for c in r)
                               + "</tr>"
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
    figs = "".join(f'<h2>{html.escape(name.replace("_", " "))}</h2>'
                   f'<img alt="{name}" src="data:image/png;base64,{data}">'
                   for name, data in images.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head><body>{body}{figs}</body></html>\n")


def files_text(paths: dict[str, Path]) -> str:
    """`/abs/dir/{report.md, report.html, delta.json}`: where the files went, resolved for display."""
    folder = {p.parent for p in paths.values()}
    names = ", ".join(p.name for p in paths.values())
    if len(folder) == 1:
        return f"{folder.pop().resolve()}/{{{names}}}"
    return ", ".join(str(p.resolve()) for p in paths.values())


def write(out_dir: Path, report: dict, render) -> dict[str, Path]:
    """report.md, report.html (self-contained) and delta.json in out_dir; `render`: report -> Markdown."""
    out_dir = Path(out_dir)
    report = clean(report)
    md = render(report)
    paths = {"md": out_dir / "report.md", "html": out_dir / "report.html", "json": out_dir / "delta.json"}
    page = html_page("deltatune delta report", md, plots(report))
    with writing("the delta report", out_dir):
        inject_write_fault("report")
        out_dir.mkdir(parents=True, exist_ok=True)
        paths["md"].write_text(md, encoding="utf-8")
        paths["html"].write_text(page, encoding="utf-8")
        # delta.json last: its presence marks a finished run (sweeps skip such runs).
        tmp = paths["json"].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        tmp.replace(paths["json"])
    return paths


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
        ax1.set_xlabel("step")
        ax1.set_ylabel("loss")
        ax1.legend()
        ax1.grid(alpha=0.3)
        lr = training["curves"]["learning_rate"]
        ax2.plot([p[0] for p in lr], [p[1] for p in lr], color="tab:green")
        ax2.set_xlabel("step")
        ax2.set_ylabel("learning rate")
        ax2.grid(alpha=0.3)
        out["training"] = png(fig)
    layers = [r for r in report["weights"]["by_layer"] if r["layer"] is not None]
    if layers:
        fig, ax = plt.subplots(figsize=(10, 3))
        ax.bar([r["layer"] for r in layers], [r["relative_norm"] for r in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("‖ΔW‖/‖W‖")
        ax.set_title("weight change per layer")
        out["layers"] = png(fig)
    types = report["weights"]["by_module_type"]
    if types:
        fig, ax = plt.subplots(figsize=(10, 3))
        ax.bar([str(r["module_type"]) for r in types], [r["relative_norm"] for r in types], color="tab:orange")
        ax.set_ylabel("‖ΔW‖/‖W‖")
        ax.set_title("weight change per module type")
        ax.tick_params(axis="x", rotation=30)
        out["module_types"] = png(fig)
    return out


def publish(out_dir: Path, report: dict, render, rows, took: str = "") -> dict[str, Path]:
    """Write the report's files, print its summary table and where the files went."""
    paths = write(out_dir, report, render)
    print_summary(rows)
    print(f"delta report: {files_text(paths)}{took}")
    return paths


@dataclass(frozen=True)
class ReportKind:
    """What one kind of delta report (delta.json `task_type`) tells a sweep and `compare`."""

    task_type: str
    compare: Callable  # (base, tuned, records, data_file, out_dir, CompareSettings, ...) -> report
    frontier_point: Callable[[str, dict, dict], dict]  # (run name, settings, report) -> the run's frontier entry
    frontier_header: tuple[str, ...]  # the frontier table's columns
    frontier_measures: Callable[[dict], list[str]]  # an entry's two forgetting columns, formatted
    forgetting_measure: str  # what the frontier's forgetting axis is
