"""Standard benchmarks in the forgetting report: EleutherAI's lm-evaluation-harness, base against tuned.

`forgetting_benchmarks` names lm-eval tasks (`hellaswag`, `arc_easy`, ..., or tasks of one's own in
lm-eval's YAML format under `benchmark_tasks_dir`). Each runs through lm-eval's Python API and its
Hugging Face backend on the model already loaded, on its device, on `benchmark_limit` samples,
seeded. The per-sample scores of base and tuned are paired by document, so the change gets the
same 95 % paired bootstrap CI as every other measure of the report. A task whose data cannot be
had (not in the local Hugging Face cache, the hub unreachable) is skipped with a line saying so,
never a crash.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from deltatune.delta.measures import paired_gain
from deltatune.errors import UserError
from deltatune.model.parts import without_adapters

PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "f1")


def check_available(tasks, tasks_dir: str | None) -> None:
    """Refused before anything loads: benchmarks without lm-eval, or a task folder that is not there."""
    if not tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("forgetting_benchmarks needs lm-evaluation-harness (pip install 'deltatune[benchmarks]', "
                        "or set forgetting_benchmarks: [])")
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise UserError(f"benchmark_tasks_dir: {tasks_dir}: no such folder (the folder of your lm-eval task "
                        "YAML files)")


def _metric(sample: dict) -> str | None:
    numeric = [k for k, v in sample.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("doc_id",)]
    return next((m for m in PREFERRED_METRICS if m in numeric), numeric[0] if numeric else None)


def score(model, tokenizer, tasks, *, limit: int, tasks_dir: str | None, seed: int, batch_size: int) -> dict:
    """{task: {"metric": name, "scores": {doc_id: value}}} or {task: {"skipped": why}}, one task at a time."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=tasks_dir, verbosity="ERROR")
    lm = HFLM(pretrained=without_adapters(model), tokenizer=tokenizer, batch_size=batch_size,
              device=str(next(model.parameters()).device))
    results = {}
    for task in tasks:
        try:
            out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, bootstrap_iters=0, verbosity="ERROR")
            samples = (out or {}).get("samples", {}).get(task) or []
            metric = _metric(samples[0]) if samples else None
            if metric is None:
                raise ValueError("it gave no per-sample scores")
            results[task] = {"metric": metric, "scores": {s["doc_id"]: float(s[metric]) for s in samples}}
        except Exception as err:  # a task lm-eval cannot load or run: its data may be out of reach offline
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"benchmark {task}: skipped ({why[:200]})", flush=True)
            results[task] = {"skipped": why[:500]}
    return results


def section(base: dict, tuned: dict, seed: int) -> dict:
    """Per task: the metric base → tuned with paired CIs (the same documents on both sides), or why it was skipped."""
    out = {}
    for task, b in base.items():
        t = tuned.get(task, {"skipped": "not run on the tuned model"})
        if "skipped" in b or "skipped" in t:
            out[task] = {"skipped": b.get("skipped") or t.get("skipped")}
            continue
        docs = sorted(set(b["scores"]) & set(t["scores"]))
        out[task] = {"name": b["metric"], **paired_gain([b["scores"][d] for d in docs], [t["scores"][d] for d in docs],
                                                         seed=seed)}
    return out
