"""Write what a run did: `summary.md` and the before/after table printed at the end.

The run's own evaluation of base and tuned model (before the delta report measures more):
validation loss, the task metric, and for a classifier per-class scores and the confusion
matrix.
"""

from __future__ import annotations

from pathlib import Path

from deltatune.delta.render import fmt

METRIC_ROWS = (("loss", "validation loss"), ("perplexity", "validation perplexity"),
               ("exact_match", "exact match (test)"),
               ("contains", "contains reference (test)"), ("regex", "matches metric_pattern (test)"),
               ("json_schema", "valid under metric_schema (test)"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"),
               ("preference_accuracy", "preference accuracy (held-out pairs)"),
               ("reward_accuracy", "reward accuracy (held-out pairs)"), ("reward_margin", "reward margin"))


def _fmt(value) -> str:
    return fmt(value, 4, fixed=True)


def comparison_rows(before: dict, after: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, label in METRIC_ROWS:
        if key in before or key in after:
            b, a = before.get(key), after.get(key)
            delta = f"{a - b:+.4f}" if isinstance(a, float) and isinstance(b, float) else "-"
            rows.append((label, _fmt(b), _fmt(a), delta))
    return rows


def print_comparison(before: dict, after: dict, title: str = "base → tuned") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "base", "tuned", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in comparison_rows(before, after):
        table.add_row(*row)
    Console().print(table)


def write_summary(out_dir: Path, *, model: str, before: dict, after: dict, fit, data_stats: dict,
                  extra: list[str] = ()) -> Path:
    """`extra`: further Markdown lines (the method section, classification details) at the end."""
    lines = [f"# deltatune run: {out_dir.name}", "", f"Base model: `{model}`", "",
             "| metric | base | tuned | change |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in comparison_rows(before, after)]
    lines += ["", "## Training", "",
              f"- optimizer steps: {fit.steps} ({fit.epochs:.2f} epochs)"
              f"{' — stopped early' if fit.stopped_early else ''}",
              f"- final training loss: {_fmt(fit.train_loss)}",
              f"- wall time: {fit.wall_seconds:.1f} s, {fit.tokens_per_second:.0f} tokens/s "
              "(real tokens, evaluations included)",
              f"- tokens: {fit.seen_tokens} fed forward, {fit.trained_tokens} trained (label tokens)"]
    for split, stats in data_stats.items():
        lines.append(f"- {split}: {stats.examples} examples, {stats.truncated} truncated, "
                     f"{stats.dropped_no_labels} dropped (no trained tokens left)")
    samples = [p for p in after.get("predictions") or [] if "output" in p][:8]
    if samples:
        base_out = {p["prompt"]: p["output"] for p in before.get("predictions", []) if "output" in p}
        lines += ["", "## Side by side (test prompts)", ""]
        for p in samples:
            lines += [f"**Prompt:** {p['prompt']}", "", f"- reference: `{p['reference']}`",
                      f"- base: `{base_out.get(p['prompt'], '')}`", f"- tuned: `{p['output']}`", ""]
    lines += list(extra)
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def classification_lines(before: dict, after: dict) -> list[str]:
    """Markdown: per-class precision/recall and the confusion matrix, base → tuned."""
    if "per_class" not in after:
        return []
    lines = ["", "## Classification", "", "| class | precision (base → tuned) | recall (base → tuned) | support |",
             "|---|---|---|---|"]
    for name, a in after["per_class"].items():
        b = before.get("per_class", {}).get(name, {})
        lines.append(f"| {name} | {b.get('precision', 0):.3f} → {a['precision']:.3f} | "
                     f"{b.get('recall', 0):.3f} → {a['recall']:.3f} | {a['support']} |")
    labels = after["labels"]
    lines += ["", "Confusion matrix after tuning (rows: true, columns: predicted):", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
              for name, row in zip(labels, after["confusion_matrix"])]
    return lines
