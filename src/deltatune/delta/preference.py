"""The delta report of a preference run: what the preference stage bought, and what it cost.

- task: held-out preference accuracy base → tuned (the model's own log-probability margin
  log π(chosen) − log π(rejected), per token for the length-normalised losses, is positive),
  with a 95 % paired bootstrap CI; the tuned model's reward accuracy and margin against the
  reference; the preference loss; KL(reference‖tuned) per token on the held-out responses;
- forgetting: the same section as SFT (general-text perplexity and KL, KL on base samples,
  fact recall, benchmarks when asked);
- weights: per-matrix ‖ΔW‖/‖W‖, effective rank, intruder dimensions;
- side by side: greedy answers of base and tuned to held-out prompts, with the chosen response.

delta.json (`task_type: "preference"`, schema version 2) has the causal report's
`forgetting`, `weights`, `training` and `seconds` sections, and:

    task: {loss_type, pairs,
        preference_accuracy: {base, base_ci, tuned, tuned_ci, gain, gain_ci, significant, examples},
        metric: (the preference_accuracy entry, named, so sweeps and scripts find the headline),
        loss: {base, tuned}, reward_accuracy: {base, tuned}, reward_margin: {base, tuned},
        kl_reference_tuned: {kl_per_token, tokens}}
    side_by_side: [{prompt, reference (the chosen response), base, tuned}]
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from deltatune.data.examples import Example, build_preference_examples
from deltatune.data.formats import Record
from deltatune.delta import measures as delta
from deltatune.delta.causal import (
    base_side,
    forgetting_markdown,
    forgetting_measures,
    forgetting_point,
    forgetting_rows,
    load_pair,
    side_by_side_markdown,
)
from deltatune.delta.causal import frontier_measures as causal_frontier_measures
from deltatune.delta.measures import CompareSettings, ReportOptions, timed
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
)
from deltatune.delta.weights import weight_delta
from deltatune.errors import UserError
from deltatune.evaluate.preference import Objective, evaluate_pairs

TASK_TYPE = "preference"


def responses(pairs: list[Example]) -> list[Example]:
    """Both sides of every pair as examples of their own (labels on the responses only)."""
    return [Example(side.input_ids, side.labels, side.source) for ex in pairs for side in (ex, ex.rejected)]


def task_measures(base, tuned, tokenizer, pairs: list[Example], before: dict, after: dict,
                  objective: Objective | None, options: ReportOptions, device) -> dict:
    """Preference accuracy base → tuned with its paired CI, reward and loss numbers, KL on the responses
    (`objective` None: `compare`, where no run's loss or reference is known)."""
    hits = [[float(p["hit"]) for p in side["predictions"]] for side in (before, after)]
    accuracy = delta.paired_gain(hits[0], hits[1], seed=options.seed)
    stats = delta.paired_pass(base, tuned, responses(pairs), tokenizer.pad_token_id, device, options.batch_size,
                              kl_on_labels=True)
    s = stats.summary()
    return {"loss_type": objective.loss_type if objective else None, "pairs": len(pairs),
            "preference_accuracy": accuracy,
            "metric": {"name": "preference_accuracy", **accuracy},
            **{key: {"base": before.get(key), "tuned": after.get(key)}
               for key in ("loss", "reward_accuracy", "reward_margin")},
            "kl_reference_tuned": {"kl_per_token": s["kl_per_token"], "tokens": int(stats.kl_tokens.sum())}}


def build(base, tuned, tokenizer, *, base_model: str, tuned_model: str, pairs: list[Example], before: dict,
          after: dict, objective: Objective | None, options: ReportOptions, device, metrics_path=None,
          fit=None) -> dict:
    report = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "task_type": TASK_TYPE,
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "base_model": display_name(base_model), "tuned_model": display_name(tuned_model)}
    seconds: dict = {}
    with timed(seconds, "task"):
        report["task"] = task_measures(base, tuned, tokenizer, pairs, before, after, objective, options, device)
    report["forgetting"] = forgetting_measures(base, tuned, tokenizer, options, device, seconds)
    with timed(seconds, "weights"):
        report["weights"] = weight_delta(base, tuned)
    base_out = [p.get("output") for p in before["predictions"]]
    report["side_by_side"] = [{"prompt": p["prompt"], "reference": p["reference"], "base": b, "tuned": p["output"]}
                              for p, b in zip(after["predictions"], base_out)
                              if "output" in p and b is not None][: options.side_by_side]
    report["training"] = training_section(metrics_path, fit)
    report["seconds"] = seconds
    return report


def after_training(model_args, options: ReportOptions, objective: Objective, tuned, tokenizer,
                   pairs: list[Example], before: dict, after: dict, fit, out_dir: Path, device) -> dict:
    """The end of a preference `deltatune train`: the reference (the base: the tuned model with its adapters off,
    or reloaded) against the tuned model, on the run's held-out pairs and its own base/tuned evaluations."""
    if not pairs:
        raise UserError("the delta report of a preference run needs held-out pairs (set validation_split > 0 or "
                        "validation_file, or delta_report: false)")
    print("measuring what preference tuning changed (delta report)...", flush=True)
    start = time.perf_counter()
    base = base_side(model_args, tuned, device)
    report = build(base, tuned, tokenizer, base_model=model_args.name, tuned_model=str(out_dir / "final"),
                   pairs=pairs, before=before, after=after, objective=objective, options=options, device=device,
                   metrics_path=out_dir / "metrics.jsonl", fit=fit)
    report["seconds"]["total"] = time.perf_counter() - start
    del base
    publish(out_dir, report, markdown, summary_rows(report), took=f" ({report['seconds']['total']:.0f} s)")
    return report


def compare(base_name: str, tuned_name: str, records: list[Record], data_file: str, out_dir: Path,
            settings: CompareSettings) -> dict:
    """`deltatune compare` on preference pairs: which of two causal LMs ranks the chosen responses higher,
    and the same forgetting and weight measures as a run's report (reference-free: each model's own margin)."""
    options = settings.options
    records = records[:settings.max_examples or 64]
    base, tuned, tokenizer, device = load_pair(base_name, tuned_name, settings)
    pairs, _ = build_preference_examples(records, tokenizer, max_seq_length=settings.max_seq_length,
                                         name=str(data_file))
    sides = [evaluate_pairs(m, tokenizer, pairs, records, None, batch_size=options.batch_size, device=device,
                            generate_for=options.side_by_side, max_new_tokens=settings.max_new_tokens)
             for m in (base, tuned)]
    start = time.perf_counter()
    metrics_path = Path(tuned_name).parent / "metrics.jsonl"
    report = build(base, tuned, tokenizer, base_model=base_name, tuned_model=tuned_name, pairs=pairs,
                   before=sides[0], after=sides[1], objective=None, options=options, device=device,
                   metrics_path=metrics_path if metrics_path.is_file() else None)
    report["seconds"]["total"] = time.perf_counter() - start
    publish(out_dir, report, markdown, summary_rows(report))
    return report


# --- writing -------------------------------------------------------------------------------

def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(measure, base, tuned, change) rows: the table the CLI prints and report.md opens with."""
    task = report["task"]
    a = task["preference_accuracy"]
    sig = "significant" if a["significant"] else "not significant"
    rows = [(f"preference accuracy (held-out, n={a['examples']})", pct(a["base"]), pct(a["tuned"]),
             f"{100 * a['gain']:+.1f} pt [{100 * a['gain_ci'][0]:+.1f}, {100 * a['gain_ci'][1]:+.1f}] {sig}")]
    for key, label in (("reward_accuracy", "reward accuracy"), ("reward_margin", "reward margin"),
                       ("loss", f"{task['loss_type'] or 'preference'} loss")):
        if task[key]["base"] is not None:
            b, t = task[key]["base"], task[key]["tuned"]
            shown = (pct(b), pct(t)) if key == "reward_accuracy" else (fmt(b), fmt(t))
            rows.append((f"{label} (held-out)", *shown, ""))
    rows.append(("KL(reference‖tuned) on held-out responses, /token", "", "",
                 fmt(task["kl_reference_tuned"]["kl_per_token"])))
    return rows + forgetting_rows(report)


def markdown(report: dict) -> str:
    task = report["task"]
    lines = ["# Delta report: what preference tuning changed", "",
              f"Reference (base) `{report['base_model']}` → tuned `{report['tuned_model']}`, loss "
             f"`{task['loss_type'] or 'none (compare)'}` "
             f"(deltatune delta schema v{report['schema_version']}, {report['created']})", "", "## Summary", ""]
    lines += md_table(["measure", "base", "tuned", "change"], [list(r) for r in summary_rows(report)])
    lines += ["", f"Preference accuracy: the share of {task['pairs']} held-out pairs whose chosen response the model "
              "gives the higher log-probability"
              + (" per token" if task["loss_type"] in ("simpo", "orpo") else "")
              + "; the reward is what the loss scores each response by (β·log π/π_ref for DPO). Intervals are 95 % "
              "paired bootstrap CIs over pairs; *significant* means the interval of the change excludes 0.", "",
              "## Forgetting (the alignment tax)", ""]
    lines += forgetting_markdown(report)
    lines += side_by_side_markdown(report["side_by_side"], reference="chosen")
    lines += training_markdown(report.get("training"))
    lines += ["", "Measurement time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def frontier_point(name: str, settings: dict, report: dict) -> dict:
    """A run's point on the frontier: preference accuracy gain against the general-text KL."""
    a = report["task"]["preference_accuracy"]
    gain = delta.gain_point(a, "preference accuracy gain", None)
    return {"name": name, "settings": settings, **gain, **forgetting_point(report), "task_type": TASK_TYPE}


KIND = ReportKind(TASK_TYPE, compare, frontier_point,
                  ("run", "gain [95% CI]", "KL general /tok", "general ppl", "fact retention", "‖ΔW‖/‖W‖",
                   "within budget", ""),
                  causal_frontier_measures, "mean per-token KL(base‖tuned) on general text")
