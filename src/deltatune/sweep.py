"""Sweeps: train a grid of settings, then chart task gain against forgetting.

    deltatune sweep CONFIG.yaml --grid learning_rate=1e-5,5e-5 num_train_epochs=1,3 [method=full,lora]

Each combination runs in `output_dir/<key-value_...>/` with the delta report on; a run whose
`delta.json` exists is finished and skipped, so an interrupted sweep resumes where it stopped
(the interrupted run restarts). Then `frontier.md/html/json` in `output_dir` list, per run,
the task gain (test-metric gain when there is a test set, otherwise the fall of validation
loss) and the forgetting (mean per-token KL(base ‖ tuned) on general text), mark the
Pareto-optimal runs (no other run has more gain with less forgetting) and recommend one.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from deltatune.config import load_config
from deltatune.errors import UserError

SCHEMA = "deltatune.frontier"
SCHEMA_VERSION = 1
NEAR_BEST_GAIN = 0.9  # the recommendation trades at most 10 % of the best gain for less forgetting


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


def run_sweep(config_path: str, grid_items: list[str], overrides: list[str] = ()) -> dict:
    from deltatune.pipeline import run

    grid = parse_grid(grid_items)
    root = Path(load_config(config_path, list(overrides)).output_dir)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # Every combination is validated before the first one trains: a typo fails in seconds.
    runs = []
    for settings in combos:
        name = run_name(settings)
        cfg = load_config(config_path, list(overrides) + [f"{k}={v}" for k, v in settings.items()] +
                          [f"output_dir={root / name}", "overwrite_output_dir=true", "delta_report=true"])
        runs.append((name, settings, cfg))
    for i, (name, settings, cfg) in enumerate(runs, 1):
        if (root / name / "delta.json").is_file():
            print(f"sweep {i}/{len(runs)}: {name} finished before, skipped", flush=True)
            continue
        print(f"sweep {i}/{len(runs)}: {name}", flush=True)
        run(cfg)
    entries = [entry(name, settings, json.loads((root / name / "delta.json").read_text(encoding="utf-8")))
               for name, settings, _ in runs]
    frontier = build_frontier(entries)
    paths = write_frontier(root, frontier)
    print_frontier(frontier)
    print(f"frontier: {paths['md']}, {paths['html']}, {paths['json']}")
    return frontier


def entry(name: str, settings: dict, report: dict) -> dict:
    """One run's point: gain (test metric, else validation loss) and forgetting (general-text KL)."""
    metric, val = report["task"].get("metric"), report["task"].get("validation")
    if metric:
        gain = {"gain": metric["gain"], "gain_ci": metric["gain_ci"], "significant": metric["significant"],
                "gain_measure": f"{metric['name']} gain"}
    elif val:
        gain = {"gain": val["loss"]["gain"], "gain_ci": val["loss"]["gain_ci"],
                "significant": val["loss"]["significant"], "gain_measure": "validation loss decrease"}
    else:
        gain = {"gain": None, "gain_ci": None, "significant": False, "gain_measure": "none"}
    g = report["forgetting"]["general_text"]
    samples = report["forgetting"].get("base_samples") or {}
    return {"name": name, "settings": settings, **gain, "forgetting": g["kl_per_token"],
            "perplexity_change": g["perplexity_change"], "kl_base_samples": samples.get("kl_per_token"),
            "fact_retention": report["forgetting"]["fact_recall"]["retention"],
            "weight_change": report["weights"]["relative_norm"]}


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Points (gain, forgetting): optimal when no other has gain ≥ and forgetting ≤, one strictly."""
    def dominates(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])
    return [not any(dominates(q, p) for q in points if q is not p) for p in points]


def build_frontier(entries: list[dict]) -> dict:
    usable = [e for e in entries if e["gain"] is not None and e["forgetting"] is not None]
    flags = pareto([(e["gain"], e["forgetting"]) for e in usable])
    for e in entries:
        e["pareto"] = False
    for e, flag in zip(usable, flags):
        e["pareto"] = flag
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "gain_measure": usable[0]["gain_measure"] if usable else "none",
            "forgetting_measure": "mean per-token KL(base‖tuned) on general text",
            "runs": entries, "recommended": recommend(usable)}


def recommend(entries: list[dict]) -> dict | None:
    """Among Pareto-optimal runs (significant gains first): the least forgetting within 10 % of the best gain."""
    front = [e for e in entries if e["pareto"]]
    if not front:
        return None
    significant = [e for e in front if e["significant"] and e["gain"] > 0]
    pool = significant or front
    best = max(e["gain"] for e in pool)
    near = [e for e in pool if e["gain"] >= NEAR_BEST_GAIN * best] if best > 0 else pool
    pick = min(near, key=lambda e: (e["forgetting"], -e["gain"]))
    reason = (f"Pareto-optimal{' with a significant gain' if significant else ' (no run has a significant gain)'}; "
              f"{pick['gain_measure']} {pick['gain']:+.4f} vs best {best:+.4f}, the least forgetting "
              f"(KL {pick['forgetting']:.4g}/token) among runs within {round(100 * (1 - NEAR_BEST_GAIN))} % of the best gain")
    return {"name": pick["name"], "settings": pick["settings"], "reason": reason}


def _f(x) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def table_rows(frontier: dict) -> list[list[str]]:
    rec = (frontier.get("recommended") or {}).get("name")
    rows = []
    for e in sorted(frontier["runs"], key=lambda e: (e["forgetting"] is None, e["forgetting"] or 0)):
        ci = f" [{e['gain_ci'][0]:+.3g}, {e['gain_ci'][1]:+.3g}]" if e["gain_ci"] else ""
        mark = ("★ " if e["name"] == rec else "") + ("pareto" if e["pareto"] else "")
        rows.append([e["name"], f"{_f(e['gain'])}{ci}", _f(e["forgetting"]),
                     "-" if e["perplexity_change"] is None else f"{100 * e['perplexity_change']:+.1f}%",
                     "-" if e["fact_retention"] is None else f"{100 * e['fact_retention']:.0f}%",
                     _f(e["weight_change"]), mark])
    return rows


HEADER = ["run", "gain [95% CI]", "KL general /tok", "general ppl", "fact retention", "‖ΔW‖/‖W‖", ""]


def markdown(frontier: dict) -> str:
    from deltatune.delta_report import _md_table

    lines = ["# Stability–plasticity frontier", "",
             f"Gain: {frontier['gain_measure']}. Forgetting: {frontier['forgetting_measure']}. "
             "Pareto-optimal: no other run has at least as much gain with at most as much forgetting.", ""]
    lines += _md_table(HEADER, table_rows(frontier))
    rec = frontier.get("recommended")
    lines += ["", f"**Recommended:** `{rec['name']}`: {rec['reason']}." if rec else "No recommendation: no run has a gain.", ""]
    return "\n".join(lines)


def plot(frontier: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltatune.delta_report import _png

    runs = [e for e in frontier["runs"] if e["gain"] is not None and e["forgetting"] is not None]
    if not runs:
        return {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in runs:
        ax.scatter(e["forgetting"], e["gain"], color="tab:red" if e["pareto"] else "tab:gray", zorder=3)
        ax.annotate(e["name"], (e["forgetting"], e["gain"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((e for e in runs if e["pareto"]), key=lambda e: e["forgetting"])
    ax.plot([e["forgetting"] for e in front], [e["gain"] for e in front], color="tab:red", alpha=0.5)
    ax.set_xlabel(frontier["forgetting_measure"]); ax.set_ylabel(frontier["gain_measure"])
    ax.set_title("task gain vs forgetting (red: Pareto-optimal)"); ax.grid(alpha=0.3)
    return {"frontier": _png(fig)}


def write_frontier(root: Path, frontier: dict) -> dict[str, Path]:
    from deltatune.delta_report import _clean, html_page

    frontier = _clean(frontier)
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
    for col in HEADER:
        table.add_column(col)
    for row in table_rows(frontier):
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)
    if frontier.get("recommended"):
        print(f"recommended: {frontier['recommended']['name']}: {frontier['recommended']['reason']}")
