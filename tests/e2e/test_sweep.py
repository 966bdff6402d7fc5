"""Sweep: a 2x1 grid on the tiny model, the frontier, and resuming."""

import json

import pytest

from deltatune.errors import UserError
from deltatune.sweep import Budget, budget_ratio, build_frontier, pareto, parse_grid, run_name

from conftest import chat, run_cli, write_jsonl


def causal_run(name, gain, kl, ppl, retention, significant=True):
    return {"name": name, "settings": {"run": name}, "gain": gain, "gain_ci": [gain - 0.1, gain + 0.1],
            "significant": significant, "gain_measure": "exact_match gain", "forgetting": kl,
            "perplexity_change": ppl, "kl_base_samples": None, "fact_retention": retention, "weight_change": 0.1,
            "task_type": "causal_lm"}


def classifier_run(name, gain, cka, significant=True):
    return {"name": name, "settings": {}, "gain": gain, "gain_ci": [gain - 0.05, gain + 0.05],
            "significant": significant,
            "gain_measure": "accuracy gain", "forgetting": 1 - cka, "cka": cka, "mean_cosine": 0.9,
            "macro_f1_gain": gain, "perplexity_change": None, "fact_retention": None, "weight_change": 0.01,
            "task_type": "classification"}


def test_pareto_and_recommendation():
    assert pareto([(1.0, 1.0), (2.0, 2.0), (0.5, 1.5), (2.0, 1.0)]) == [False, False, False, True]
    runs = [causal_run(n, g, f, 0.0, 1.0) for n, g, f in [("a", 0.50, 0.30), ("b", 0.48, 0.05), ("c", 0.20, 0.01),
                                                          ("d", 0.10, 0.20)]]
    frontier = build_frontier(runs)
    assert [r["pareto"] for r in frontier["runs"]] == [True, True, True, False]
    # Nobody forgets beyond the budget (perplexity unchanged, every fact kept): the highest gain wins.
    assert frontier["recommended"]["name"] == "a" and frontier["recommended"]["within_budget"]


def test_recommendation_on_the_demo_frontier_stays_within_the_forgetting_budget():
    # The README's measured demo sweep: the old rule picked full-5e-4 (+55 % perplexity, 38 % facts).
    runs = [causal_run("lora-5e-5", 0.12, 0.0015, -0.007, 0.99), causal_run("full-5e-5", 0.88, 0.0190, 0.005, 0.97),
            causal_run("lora-5e-4", 0.55, 0.0898, 0.054, 0.94), causal_run("full-5e-4", 1.00, 0.5791, 0.553, 0.38)]
    frontier = build_frontier(runs)
    rec = frontier["recommended"]
    assert rec["name"] == "full-5e-5" and rec["within_budget"] and rec["settings"] == {"run": "full-5e-5"}
    assert "full-5e-4 gains more" in rec["reason"] and "+55.3%" in rec["reason"]  # it says what it passed over
    assert [r["within_budget"] for r in frontier["runs"]] == [True, True, True, False]
    assert "≤ 10%" in frontier["rule"] and "≥ 90%" in frontier["rule"]


def test_recommendation_when_no_run_fits_the_budget_or_none_is_significant():
    over = [causal_run("a", 0.9, 0.5, 0.40, 0.95), causal_run("b", 0.5, 0.2, 0.12, 0.85),  # b: 1.2× and 1.5×
            causal_run("c", 0.7, 0.3, 0.25, 0.80)]
    frontier = build_frontier(over)
    rec = frontier["recommended"]
    assert rec["name"] == "b" and not rec["within_budget"]
    assert budget_ratio(over[1], Budget()) == pytest.approx(1.5)
    assert "no run with a significant gain stays within the forgetting budget" in rec["reason"]
    assert "1.50× the budget" in rec["reason"]
    # A significant gain outranks a bigger but uncertain one; a within-budget one is preferred.
    mixed = [causal_run("big-ns", 0.9, 0.01, 0.0, 1.0, significant=False), causal_run("small", 0.2, 0.01, 0.02, 0.95)]
    assert build_frontier(mixed)["recommended"]["name"] == "small"
    # No significant gain anywhere: the positive ones are candidates, and the reason says it is tentative.
    frontier = build_frontier([causal_run("x", 0.3, 0.01, 0.0, 1.0, False),
                               causal_run("y", -0.1, 0.0, 0.0, 1.0, False)])
    assert frontier["recommended"]["name"] == "x" and "tentative" in frontier["recommendation_reason"]
    # Nothing improved: no recommendation, and the frontier says why.
    frontier = build_frontier([causal_run("y", -0.1, 0.0, 0.0, 1.0, True), causal_run("z", 0.0, 0.0, 0.0, 1.0, False)])
    assert frontier["recommended"] is None and "no positive gain" in frontier["recommendation_reason"]
    assert "No recommendation" in __import__("deltatune.sweep", fromlist=["markdown"]).markdown(frontier)


def test_classification_recommendation_uses_the_cka_budget():
    runs = [classifier_run("lr-1e-3", 0.60, 0.70), classifier_run("lr-1e-4", 0.50, 0.93),
            classifier_run("lr-1e-5", 0.20, 0.995), classifier_run("lr-1e-6", 0.02, 0.9999, significant=False)]
    frontier = build_frontier(runs)
    assert frontier["task_type"] == "classification" and "CKA" in frontier["forgetting_measure"]
    assert frontier["recommended"]["name"] == "lr-1e-4"  # the highest gain with CKA ≥ 0.9
    assert ("lr-1e-3 gains more" in frontier["recommendation_reason"]
            and "CKA 0.700" in frontier["recommendation_reason"])
    assert build_frontier(runs, Budget(min_cka=0.99))["recommended"]["name"] == "lr-1e-5"
    with pytest.raises(UserError, match="--min-cka 1.0"):
        Budget(min_cka=1.0)


def test_grid_parsing():
    assert parse_grid(["learning_rate=1e-5,5e-5", "method=full"]) == {"learning_rate": ["1e-5", "5e-5"],
                                                                      "method": ["full"]}
    assert run_name({"learning_rate": "1e-5", "num_train_epochs": "1"}) == "learning_rate-1e-5_num_train_epochs-1"


def test_sweep_runs_each_setting_writes_the_frontier_and_resumes(tmp_path, tiny_model_dir, sft_file):
    write_jsonl(tmp_path / "test.jsonl", [chat("say fox", "fox fox"), chat("say dog", "dog dog")])
    config = tmp_path / "sweep.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\ntest_file: test.jsonl\noutput_dir: sw\n"
                      "per_device_train_batch_size: 8\nmax_new_tokens: 4\nbf16: false\nkl_samples: 2\n")
    proc = run_cli("sweep", str(config), "--grid", "learning_rate=1e-4,5e-3", "num_train_epochs=1")
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "sw"
    names = ["learning_rate-1e-4_num_train_epochs-1", "learning_rate-5e-3_num_train_epochs-1"]
    assert all((root / n / "delta.json").is_file() and (root / n / "final").is_dir() for n in names)
    frontier = json.loads((root / "frontier.json").read_text())
    assert frontier["schema"] == "deltatune.frontier" and [r["name"] for r in frontier["runs"]] == names
    assert any(r["pareto"] for r in frontier["runs"]) and frontier["recommendation_reason"]
    assert frontier["recommended"] is None or frontier["recommended"]["name"] in names
    # The larger learning rate moves the weights further.
    change = {r["name"]: r["weight_change"] for r in frontier["runs"]}
    assert change[names[1]] > change[names[0]] > 0
    assert "data:image/png;base64," in (root / "frontier.html").read_text()
    md = (root / "frontier.md").read_text()
    assert ("**Recommended:**" in md or "**No recommendation:**" in md) and "**Rule:**" in md

    proc = run_cli("sweep", str(config), "--grid", "learning_rate=1e-4,5e-3", "num_train_epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("finished before, skipped") == 2


def test_sweep_bad_grid_key_fails_before_training(tmp_path, tiny_model_dir, sft_file):
    config = tmp_path / "sweep.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\noutput_dir: sw\n")
    proc = run_cli("sweep", str(config), "--grid", "learning_rat=1e-4,5e-3")
    assert proc.returncode == 2 and "did you mean 'learning_rate'" in proc.stderr
    assert not (tmp_path / "sw").exists()
