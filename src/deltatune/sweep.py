"""Sweeps: train a grid of settings, then chart task gain against forgetting.

    deltatune sweep CONFIG.yaml --grid learning_rate=1e-5,5e-5 num_train_epochs=1,3 [method=full,lora]

Each combination runs in `output_dir/<key-value_...>/` with the delta report on; a run whose
`delta.json` exists is finished and skipped, so an interrupted sweep resumes where it stopped
(the interrupted run restarts). Then `frontier.md/html/json` in `output_dir` list, per run,
the task gain (test-metric gain when there is a test set, otherwise the fall of validation
loss; accuracy gain for a classifier) and the forgetting (mean per-token KL(base ‖ tuned) on
general text; 1 − linear CKA of the backbone's sentence embeddings for a classifier), mark the
Pareto-optimal runs (no other run has more gain with less forgetting) and recommend one by the
rule in `recommend` (RULE below), which states its reason.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from deltatune.config import load_config
from deltatune.delta.render import clean, files_text, fmt, html_page, md_table, png
from deltatune.errors import UserError
from deltatune.pipeline import run
from deltatune.tasks import report_kind

SCHEMA = "deltatune.frontier"
SCHEMA_VERSION = 2  # 2: forgetting budget, within_budget/budget_ratio per run, classification runs


@dataclass(frozen=True)
class Budget:
    """How much forgetting a recommended run may show (the defaults of `deltatune sweep`)."""
    max_perplexity_increase: float = 0.10  # causal: general-text perplexity at most +10 %
    min_fact_retention: float = 0.90       # causal: at least 90 % of the facts the base knew
    min_cka: float = 0.90                  # classification: backbone CKA on general text at least 0.9

    def __post_init__(self):
        if not self.max_perplexity_increase > 0:
            raise UserError(f"--max-perplexity-increase {self.max_perplexity_increase}: must be > 0 (0.1 = +10 %)")
        for flag, value in (("--min-fact-retention", self.min_fact_retention), ("--min-cka", self.min_cka)):
            if not 0 <= value < 1:
                raise UserError(f"{flag} {value}: must be at least 0 and below 1 (e.g. 0.9)")


RULE = ("Only runs with a positive, significant gain (95 % CI above 0) are candidates; if none has one, runs "
        "with a positive gain are, and the reason says so. Among candidates within the forgetting budget "
        "(causal: general-text perplexity increase ≤ {ppl:.0%} and fact retention ≥ {ret:.0%}; classification: "
        "backbone CKA ≥ {cka:.2f}), the one with the highest gain is recommended (ties: less forgetting). If no "
        "candidate is within the budget, the one that overshoots it least is recommended (overshoot: the largest "
        "of perplexity increase / {ppl:.0%}, lost facts / {lost:.0%}, (1 − CKA) / {drift:.2f}; ties: more gain), "
        "and the reason says so. A run with no positive gain is never recommended.")


def rule_text(budget: Budget) -> str:
    return RULE.format(ppl=budget.max_perplexity_increase, ret=budget.min_fact_retention, cka=budget.min_cka,
                       lost=1 - budget.min_fact_retention, drift=1 - budget.min_cka)


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise UserError(f"--grid '{item}' is not KEY=V1,V2 (e.g. learning_rate=1e-5,5e-5)")
        if key in ("output_dir", "overwrite_output_dir", "delta_report"):
            raise UserError(f"--grid '{key}': the sweep sets this key itself (one folder per run, report on)")
        if key in grid:
            raise UserError(f"--grid '{key}' is given twice (list all its values in one KEY=V1,V2)")
        grid[key] = choices
    return grid


def run_name(settings: dict[str, str]) -> str:
    return "_".join(f"{k}-{re.sub(r'[^A-Za-z0-9.+-]', '', v)}" for k, v in settings.items())


def run_sweep(config_path: str, grid_items: list[str], overrides: list[str] = (), budget: Budget = Budget()) -> dict:
    grid = parse_grid(grid_items)
    root = Path(load_config(config_path, list(overrides)).output.output_dir)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # Every combination is validated before the first one trains: a typo fails in seconds.
    runs = []
    for settings in combos:
        name = run_name(settings)
        cfg = load_config(config_path, list(overrides) + [f"{k}={v}" for k, v in settings.items()] +
                          [f"output_dir={root / name}", "overwrite_output_dir=true", "delta_report=true"])
        runs.append((name, settings, cfg))
    for i, (name, _settings, cfg) in enumerate(runs, 1):
        if (root / name / "delta.json").is_file():
            print(f"sweep {i}/{len(runs)}: {name} finished before, skipped", flush=True)
            continue
        print(f"sweep {i}/{len(runs)}: {name}", flush=True)
        run(cfg)
    entries = [entry(name, settings, json.loads((root / name / "delta.json").read_text(encoding="utf-8")))
               for name, settings, _ in runs]
    frontier = build_frontier(entries, budget)
    paths = write_frontier(root, frontier)
    print_frontier(frontier)
    print(f"frontier: {files_text(paths)}")
    return frontier


def entry(name: str, settings: dict, report: dict) -> dict:
    """One run's point: gain (test metric, else validation loss; accuracy for a classifier) and
    forgetting (general-text KL; 1 − CKA for a classifier), as its report kind defines them."""
    return report_kind(report.get("task_type", "causal_lm")).frontier_point(name, settings, report)


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Points (gain, forgetting): optimal when no other has gain ≥ and forgetting ≤, one strictly."""
    def dominates(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])
    return [not any(dominates(q, p) for q in points if q is not p) for p in points]


def build_frontier(entries: list[dict], budget: Budget = Budget()) -> dict:
    usable = [e for e in entries if e["gain"] is not None and e["forgetting"] is not None]
    flags = pareto([(e["gain"], e["forgetting"]) for e in usable])
    for e in entries:
        e["pareto"] = False
        e["budget_ratio"] = budget_ratio(e, budget)
        e["within_budget"] = e["budget_ratio"] is not None and e["budget_ratio"] <= 1.0
    for e, flag in zip(usable, flags):
        e["pareto"] = flag
    task_type = entries[0].get("task_type", "causal_lm") if entries else "causal_lm"
    recommended, reason = recommend(usable, budget)
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "task_type": task_type,
            "gain_measure": usable[0]["gain_measure"] if usable else "none",
            "forgetting_measure": report_kind(task_type).forgetting_measure, "budget": asdict(budget),
            "rule": rule_text(budget),
            "runs": entries, "recommended": recommended, "recommendation_reason": reason}


def _known(x) -> bool:
    return x is not None and x == x  # NaN (a measure that could not be taken) counts as unknown


def budget_ratio(e: dict, budget: Budget) -> float | None:
    """How much of the forgetting budget a run uses: ≤ 1 within it, 1.5 = 50 % over. None: not measured."""
    parts = []
    if _known(e.get("perplexity_change")):
        parts.append(e["perplexity_change"] / budget.max_perplexity_increase)
    if _known(e.get("fact_retention")):
        parts.append((1.0 - e["fact_retention"]) / (1.0 - budget.min_fact_retention))
    if _known(e.get("cka")):
        parts.append((1.0 - e["cka"]) / (1.0 - budget.min_cka))
    return max(parts) if parts else None


def _forgetting_text(e: dict) -> str:
    parts = []
    if _known(e.get("perplexity_change")):
        parts.append(f"general perplexity {100 * e['perplexity_change']:+.1f}%")
    if _known(e.get("fact_retention")):
        parts.append(f"fact retention {100 * e['fact_retention']:.0f}%")
    if _known(e.get("cka")):
        parts.append(f"backbone CKA {e['cka']:.3f}")
    return ", ".join(parts) or "forgetting not measured"


def recommend(entries: list[dict], budget: Budget = Budget()) -> tuple[dict | None, str]:
    """(the recommended run or None, why): the rule in RULE, applied to runs with a gain and a forgetting."""
    significant = [e for e in entries if e["significant"] and e["gain"] > 0]
    candidates = significant or [e for e in entries if e["gain"] > 0]
    if not candidates:
        return None, "no run improved the task (no positive gain), so none is recommended"
    kind = "a significant gain" if significant else "a positive gain"
    which = f"runs with {kind}" + ("" if significant else " (none is significant: treat the pick as tentative)")
    ratio = {id(e): budget_ratio(e, budget) for e in candidates}
    within = [e for e in candidates if ratio[id(e)] is not None and ratio[id(e)] <= 1.0]
    if within:
        pick = max(within, key=lambda e: (e["gain"], -e["forgetting"]))
        reason = (f"the highest {pick['gain_measure']} ({pick['gain']:+.4g}) among {len(within)} of {len(candidates)} "
                  f"{which} that stay within the forgetting budget ({_forgetting_text(pick)})")
        better = [e for e in candidates if e["gain"] > pick["gain"]]
        if better:
            top = max(better, key=lambda e: e["gain"])
            reason += f"; {top['name']} gains more ({top['gain']:+.4g}) but forgets too much ({_forgetting_text(top)})"
    else:
        pick = min(candidates, key=lambda e: (float("inf") if ratio[id(e)] is None else ratio[id(e)], -e["gain"]))
        reason = (f"no run with {kind} stays within the forgetting budget; "
                  f"{pick['name']} overshoots it least ({_forgetting_text(pick)}, {_ratio_text(ratio[id(pick)])}) "
                  f"with {pick['gain_measure']} {pick['gain']:+.4g}: the best trade-off, not a safe setting")
    return {"name": pick["name"], "settings": pick["settings"], "reason": reason,
            "within_budget": bool(within)}, reason


def _ratio_text(r: float | None) -> str:
    return "overshoot unknown" if r is None else f"{r:.2f}× the budget"


def table_rows(frontier: dict) -> list[list[str]]:
    rec = (frontier.get("recommended") or {}).get("name")
    kind = report_kind(frontier.get("task_type", "causal_lm"))
    rows = []
    for e in sorted(frontier["runs"], key=lambda e: (e["forgetting"] is None, e["forgetting"] or 0)):
        ci = f" [{e['gain_ci'][0]:+.3g}, {e['gain_ci'][1]:+.3g}]" if e["gain_ci"] else ""
        mark = ("★ " if e["name"] == rec else "") + ("pareto" if e["pareto"] else "")
        measures = kind.frontier_measures(e)
        budget = "-" if e.get("budget_ratio") is None else ("yes" if e["within_budget"] else "no")
        rows.append([e["name"], f"{fmt(e['gain'])}{ci}" + ("" if e["significant"] else " (n.s.)"),
                     fmt(e["forgetting"]), *measures, fmt(e["weight_change"]), budget, mark])
    return rows


def header(frontier: dict) -> list[str]:
    return list(report_kind(frontier.get("task_type", "causal_lm")).frontier_header)


def markdown(frontier: dict) -> str:
    lines = ["# Stability–plasticity frontier", "",
             f"Gain: {frontier['gain_measure']}. Forgetting: {frontier['forgetting_measure']}. "
             "Pareto-optimal: no other run has at least as much gain with at most as much forgetting.", ""]
    lines += md_table(header(frontier), table_rows(frontier))
    rec = frontier.get("recommended")
    reason = frontier.get("recommendation_reason") or "no run has a gain"
    lines += ["", f"**Recommended:** `{rec['name']}`: {reason}." if rec else f"**No recommendation:** {reason}.", "",
              f"**Rule:** {frontier['rule']}" if frontier.get("rule") else "", ""]
    return "\n".join(lines)


def plot(frontier: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [e for e in frontier["runs"] if e["gain"] is not None and e["forgetting"] is not None]
    if not runs:
        return {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in runs:
        ax.scatter(e["forgetting"], e["gain"], color="tab:red" if e["pareto"] else "tab:gray", zorder=3)
        ax.annotate(e["name"], (e["forgetting"], e["gain"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((e for e in runs if e["pareto"]), key=lambda e: e["forgetting"])
    ax.plot([e["forgetting"] for e in front], [e["gain"] for e in front], color="tab:red", alpha=0.5)
    ax.set_xlabel(frontier["forgetting_measure"])
    ax.set_ylabel(frontier["gain_measure"])
    ax.set_title("task gain vs forgetting (red: Pareto-optimal)")
    ax.grid(alpha=0.3)
    return {"frontier": png(fig)}


def write_frontier(root: Path, frontier: dict) -> dict[str, Path]:
    frontier = clean(frontier)
    md = markdown(frontier)
    paths = {"md": root / "frontier.md", "html": root / "frontier.html", "json": root / "frontier.json"}
    paths["md"].write_text(md, encoding="utf-8")
    paths["html"].write_text(html_page("deltatune frontier", md, plot(frontier)), encoding="utf-8")
    paths["json"].write_text(json.dumps(frontier, indent=2) + "\n", encoding="utf-8")
    return paths


def print_frontier(frontier: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="stability–plasticity frontier")
    for i, col in enumerate(header(frontier)):
        table.add_column(col, no_wrap=i == 0)  # the run name is the row's identity: never cut it
    for row in table_rows(frontier):
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)
    if frontier.get("recommended"):
        print(f"recommended: {frontier['recommended']['name']}: {frontier['recommendation_reason']}")
    else:
        print(f"no recommendation: {frontier.get('recommendation_reason')}")
