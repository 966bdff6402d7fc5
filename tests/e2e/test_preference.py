"""task: preference from the CLI on the tiny model: LoRA and full DPO end to end with the delta report,
the stored reference, exact resume, the bad inputs, and a sweep over beta."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.data.batching import collate
from deltatune.data.examples import build_preference_examples
from deltatune.data.formats import load_records
from deltatune.evaluate.preference import REFERENCE_FILE, response_logps
from deltatune.model.load import load_causal_lm

from conftest import run_cli, write_jsonl

WORDS = ["fox", "dog", "cat", "sun", "sky", "tea"]
CONFIG = """model: {model}
task: preference
method: {method}
loss_type: {loss}
train_file: pairs.jsonl
validation_split: 0.25
output_dir: out
learning_rate: {lr}
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
max_steps: {steps}
logging_steps: 2
eval_steps: 3
bf16: false
report_to: none
kl_samples: 0
side_by_side_prompts: 2
max_new_tokens: 6
"""


def make_run(root, model_dir, method="lora", loss="dpo", steps=6, lr=5e-3, extra=""):
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "pairs.jsonl", [{"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": f"no {w} at all"}
                                       for w in WORDS * 4])
    config = root / "run.yaml"
    config.write_text(CONFIG.format(model=model_dir, method=method, loss=loss, steps=steps, lr=lr) + extra)
    return config


def records(out, key=None):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key is None or key in r]


def train_steps(out):
    return [r for r in records(out, "loss") if "event" not in r]


def test_lora_dpo_end_to_end(tmp_path, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir)
    assert main(["train", str(config)]) == 0
    out = tmp_path / "out"
    steps = train_steps(out)
    assert [r["step"] for r in steps] == [2, 4, 6]
    for r in steps:  # every logging step reports the preference numbers
        assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logp_chosen",
                "logp_rejected"} <= set(r)
        assert 0.0 <= r["reward_accuracy"] <= 1.0
    assert steps[-1]["loss"] < steps[0]["loss"] < 0.6932  # DPO starts at log 2 (policy = reference)
    base_eval, tuned_eval = (next(r for r in records(out) if r.get("event") == e) for e in ("base_eval", "tuned_eval"))
    assert base_eval["loss"] == pytest.approx(0.6931471805599453) and base_eval["reward_accuracy"] == 0.0
    assert tuned_eval["reward_margin"] > 0 and tuned_eval["loss"] < base_eval["loss"]
    assert tuned_eval["pairs"] == 6
    # Only the adapters trained: B moved off zero, the base weights inside the adapter are the base's.
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for n, t in adapter.items() if "lora_B" in n)
    assert not (out / REFERENCE_FILE).exists()  # the reference is the base with the adapters off
    report = json.loads((out / "delta.json").read_text())
    assert report["task_type"] == "preference"
    task = report["task"]
    assert task["loss_type"] == "dpo" and task["pairs"] == 6
    acc = task["preference_accuracy"]
    assert acc["examples"] == 6 and acc["base"] == pytest.approx(base_eval["preference_accuracy"])
    assert acc["tuned"] == pytest.approx(tuned_eval["preference_accuracy"])
    assert task["reward_accuracy"] == {"base": 0.0, "tuned": tuned_eval["reward_accuracy"]}
    assert task["kl_reference_tuned"]["kl_per_token"] > 0 and task["kl_reference_tuned"]["tokens"] > 0
    assert {"general_text", "fact_recall"} <= set(report["forgetting"]) and report["weights"]["relative_norm"] > 0
    assert len(report["side_by_side"]) == 2 and {"prompt", "reference", "base", "tuned"} <= set(
        report["side_by_side"][0])
    text = (out / "report.md").read_text()
    assert "preference accuracy" in text and "Side by side" in text and "alignment tax" in text

    # compare: the same report for any two models on a preference file (each model's own margins, no loss).
    assert main(["compare", "--base", str(tiny_model_dir), "--tuned", str(out / "final"), "--data",
                 str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "cmp"), "--kl-samples", "0"]) == 0
    compared = json.loads((tmp_path / "cmp" / "delta.json").read_text())
    assert compared["task_type"] == "preference" and compared["task"]["pairs"] == 24
    assert compared["task"]["loss"] == {"base": None, "tuned": None} and compared["task"]["loss_type"] is None
    assert compared["task"]["preference_accuracy"]["examples"] == 24


def base_logps(model_dir, pairs_file):
    """The base's summed response log-probabilities of every pair's two sides, computed here independently."""
    model, tokenizer = load_causal_lm(str(model_dir))
    pairs, _ = build_preference_examples(load_records(pairs_file)[0], tokenizer, max_seq_length=1024)
    with torch.no_grad():
        return response_logps(model.eval(), collate(pairs, tokenizer.pad_token_id))[0].double()


def test_full_dpo_stores_the_reference_once_and_trains_every_weight(tmp_path, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir, method="full", lr=1e-3)
    assert main(["train", str(config)]) == 0
    out = tmp_path / "out"
    stored = load_file(out / REFERENCE_FILE)
    assert set(stored) == {"train", "validation", "fingerprint"}
    assert stored["train"].shape == (18, 2) and stored["validation"].shape == (6, 2)
    # The stored values are the base's own log-probabilities of each pair's two sides.
    everything = base_logps(tiny_model_dir, tmp_path / "pairs.jsonl").view(-1, 2)
    for row in torch.cat([stored["train"], stored["validation"]]):
        assert any(torch.allclose(row, other, rtol=1e-5) for other in everything)
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(out / "final" / "model.safetensors")
    assert all(not torch.equal(base[n], tuned[n]) for n in base if n in tuned)  # full fine-tuning: all moved
    steps = train_steps(out)
    assert steps[-1]["loss"] < steps[0]["loss"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_killed_preference_run_resumes_bit_identical(tmp_path, tiny_model_dir, method):
    extra = "save_steps: 3\n"
    straight = make_run(tmp_path / "straight", tiny_model_dir, method=method, steps=8, extra=extra)
    crashed = make_run(tmp_path / "crashed", tiny_model_dir, method=method, steps=8, extra=extra)
    assert main(["train", str(straight), "delta_report=false"]) == 0
    proc = run_cli("train", str(crashed), "delta_report=false", env={"DELTATUNE_TEST_KILL": "step:5"})
    assert proc.returncode == -9, proc.stderr
    reference = tmp_path / "crashed" / "out" / REFERENCE_FILE
    stored_at = reference.stat().st_mtime_ns if method == "full" else None
    assert main(["train", str(crashed), "delta_report=false", "--resume"]) == 0
    if method == "full":  # the resume read the reference back instead of computing it again
        assert reference.stat().st_mtime_ns == stored_at
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    want = load_file(tmp_path / "straight" / "out" / "final" / name)
    got = load_file(tmp_path / "crashed" / "out" / "final" / name)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    def logged(out):
        volatile = {"tokens_per_second", "elapsed_seconds"}
        return [{k: v for k, v in r.items() if k not in volatile} for r in records(out) if r.get("event") != "resume"]
    assert logged(tmp_path / "crashed" / "out") == logged(tmp_path / "straight" / "out")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "say x", "chosen": "same", "rejected": "same"}, "pairs.jsonl:3: fields 'chosen' and 'rejected' are "
                                                                "identical"),
    ({"prompt": "say x", "chosen": "a"}, "pairs.jsonl:3: missing field 'rejected'"),
])
def test_bad_pairs_fail_in_one_line_and_write_nothing(tmp_path, tiny_model_dir, record, message):
    config = make_run(tmp_path, tiny_model_dir)
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    lines.insert(2, json.dumps(record))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("train", str(config))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_preference_keys_belong_to_task_preference(tmp_path, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir)
    proc = run_cli("train", str(config), "task=sft", "beta=0.5")
    assert proc.returncode == 2 and "beta: only task 'preference' reads this" in proc.stderr
    proc = run_cli("train", str(config), "simpo_gamma=1.0")
    assert proc.returncode == 2 and "simpo_gamma applies to loss_type simpo" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run_cli("train", str(config), "test_file=pairs.jsonl")
    assert proc.returncode == 2 and "task 'preference' is scored on held-out pairs" in proc.stderr


def test_sweep_over_beta_draws_the_preference_frontier(tmp_path, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir, steps=3)
    proc = run_cli("sweep", str(config), "--grid", "beta=0.1,1.0")
    assert proc.returncode == 0, proc.stderr
    frontier = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert frontier["task_type"] == "preference" and frontier["gain_measure"] == "preference accuracy gain"
    assert [r["name"] for r in frontier["runs"]] == ["beta-0.1", "beta-1.0"]
