"""Sweep: a 2x1 grid on the tiny model, the frontier, and resuming."""

import json

from conftest import chat, run_cli, write_jsonl
from deltatune.sweep import build_frontier, pareto, parse_grid, run_name


def test_pareto_and_recommendation():
    assert pareto([(1.0, 1.0), (2.0, 2.0), (0.5, 1.5), (2.0, 1.0)]) == [False, False, False, True]
    runs = [{"name": n, "settings": {}, "gain": g, "gain_ci": [g - 0.1, g + 0.1], "significant": True,
             "gain_measure": "exact_match gain", "forgetting": f, "perplexity_change": 0.0,
             "kl_base_samples": None, "fact_retention": 1.0, "weight_change": 0.1}
            for n, g, f in [("a", 0.50, 0.30), ("b", 0.48, 0.05), ("c", 0.20, 0.01), ("d", 0.10, 0.20)]]
    frontier = build_frontier(runs)
    assert [r["pareto"] for r in frontier["runs"]] == [True, True, True, False]
    # b gives 96 % of the best gain with a sixth of the forgetting.
    assert frontier["recommended"]["name"] == "b"


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
    assert any(r["pareto"] for r in frontier["runs"]) and frontier["recommended"]["name"] in names
    # The larger learning rate moves the weights further.
    change = {r["name"]: r["weight_change"] for r in frontier["runs"]}
    assert change[names[1]] > change[names[0]] > 0
    assert "data:image/png;base64," in (root / "frontier.html").read_text()
    assert "Recommended" in (root / "frontier.md").read_text()

    proc = run_cli("sweep", str(config), "--grid", "learning_rate=1e-4,5e-3", "num_train_epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("finished before, skipped") == 2


def test_sweep_bad_grid_key_fails_before_training(tmp_path, tiny_model_dir, sft_file):
    config = tmp_path / "sweep.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\noutput_dir: sw\n")
    proc = run_cli("sweep", str(config), "--grid", "learning_rat=1e-4,5e-3")
    assert proc.returncode == 2 and "did you mean 'learning_rate'" in proc.stderr
    assert not (tmp_path / "sw").exists()
