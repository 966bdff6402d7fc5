"""Standard benchmarks in the forgetting report: lm-evaluation-harness on base and tuned, offline.

The task is this folder's own `benchmark_tasks/deltatune_facts.yaml` (lm-eval's YAML task format
over a local JSONL file); a model made worse must score lower, with a paired CI, and a task whose
data cannot be had is skipped with a line, not a crash.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from deltatune.cli import main

from conftest import chat, write_jsonl

TASKS = Path(__file__).parent / "benchmark_tasks"


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch):
    """The task folder copied to the working directory (its data_files path is relative to it)."""
    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


@pytest.mark.integration
def test_a_damaged_model_scores_lower_and_an_unreachable_task_is_skipped(tmp_path, tasks_dir, capsys):
    from deltatune.model.load import load_causal_lm, save_pretrained_atomic

    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    torch.manual_seed(0)
    with torch.no_grad():  # the attention of every block scrambled: the facts go
        for name, p in model.named_parameters():
            if "self_attn" in name and p.ndim == 2:
                p.add_(torch.randn_like(p) * p.std() * 3)
    save_pretrained_atomic(model, tokenizer, tmp_path / "damaged")
    data = write_jsonl(tmp_path / "chats.jsonl", [chat("Say hi.", "Hi!"), chat("Say bye.", "Bye!")])
    out = tmp_path / "report"
    assert main(["compare", "--base", "smollm2-135m-instruct", "--tuned", str(tmp_path / "damaged"), "--data",
                 str(data), "--out", str(out), "--metric", "none", "--kl-samples", "0", "--side-by-side", "0",
                 "--benchmarks", "deltatune_facts,hellaswag", "--benchmark-tasks-dir", str(tasks_dir)]) == 0
    bench = json.loads((out / "delta.json").read_text())["forgetting"]["benchmarks"]
    facts = bench["deltatune_facts"]
    assert facts["name"] == "acc" and facts["examples"] == 16
    assert facts["base"] >= 0.8 and facts["tuned"] < facts["base"] and facts["gain"] < 0
    assert facts["gain_ci"][0] <= facts["gain"] <= facts["gain_ci"][1]
    assert set(bench["hellaswag"]) == {"skipped"}  # its data is on the hub, out of reach here
    assert "benchmark hellaswag: skipped" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "Benchmarks (lm-evaluation-harness" in md and "| deltatune_facts | acc |" in md
    assert "deltatune_facts" in (out / "report.html").read_text()


def test_a_training_run_reports_its_benchmarks(tmp_path, tiny_model_dir, tasks_dir):
    write_jsonl(tmp_path / "train.jsonl", [chat(f"say {w}", f"{w} {w}") for w in ["fox", "dog", "cat", "sun"] * 4])
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\noutput_dir: out\nmax_steps: 2\nbf16: false\n"
                      "metric: none\nkl_samples: 0\nside_by_side_prompts: 0\nforgetting_benchmarks: [deltatune_facts]\n"
                      f"benchmark_limit: 5\nbenchmark_tasks_dir: {tasks_dir}\n")
    assert main(["train", str(config)]) == 0
    report = json.loads((tmp_path / "out" / "delta.json").read_text())
    facts = report["forgetting"]["benchmarks"]["deltatune_facts"]
    assert facts["examples"] == 5 and 0 <= facts["base"] <= 1 and 0 <= facts["tuned"] <= 1
    assert "benchmarks" in report["seconds"]


def test_benchmarks_are_refused_before_anything_loads_without_their_folder(tmp_path, tiny_model_dir, capsys):
    write_jsonl(tmp_path / "train.jsonl", [chat("say fox", "fox fox")] * 4)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\noutput_dir: out\n"
                      "forgetting_benchmarks: [mine]\nbenchmark_tasks_dir: no_such_folder\n")
    assert main(["train", str(config)]) == 2
    captured = capsys.readouterr()
    assert "benchmark_tasks_dir" in captured.err and "no such folder" in captured.err and "method:" not in captured.out
    assert not (tmp_path / "out").exists()
