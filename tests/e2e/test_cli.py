"""End to end through the command line on a tiny model."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, chat, run_cli, write_jsonl


def test_train_end_to_end(tmp_path, tiny_model_dir, sft_file):
    config = tmp_path / "run.yaml"
    test = write_jsonl(tmp_path / "test.jsonl", [chat("say fox", "fox fox"), chat("say dog", "dog dog")])
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\ntest_file: test.jsonl\n"
                      "output_dir: out\nlearning_rate: 5e-3\nnum_train_epochs: 3\nper_device_train_batch_size: 4\n"
                      "logging_steps: 2\nmax_new_tokens: 8\nbf16: false\n")
    proc = run_cli("train", str(config), "validation_split=0.25", env={"DELTATUNE_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert {"final", "config.yaml", "metrics.jsonl", "summary.md", "tensorboard"} <= {p.name for p in out.iterdir()}
    # Plain transformers loads the result, chat template included.
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert model.config.num_hidden_layers == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    base = next(row for row in lines if row.get("event") == "base_eval")
    tuned = next(row for row in lines if row.get("event") == "tuned_eval")
    assert tuned["loss"] < base["loss"]
    summary = (out / "summary.md").read_text()
    assert "validation loss" in summary and "exact match" in summary
    assert "validation_split: 0.25" in (out / "config.yaml").read_text()
    # Not on a terminal: one plain progress line per stage, on stderr; stdout keeps the results.
    for stage in ("reading", "tokenising train: 18 records in", "tokenising validation: 6 records in",
                  "evaluating the base:", "evaluating the tuned model:", "delta report: general text:",
                  "delta report: fact recall:", "delta report: weights:"):
        assert stage in proc.stderr and stage not in proc.stdout, stage

    # The tuned folder works with eval and generate.
    proc = run_cli("eval", "--model", str(out / "final"), "--data", str(test), "--out", str(tmp_path / "e.json"),
                   "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert {"loss", "perplexity", "exact_match"} <= set(result) and 0.0 <= result["exact_match"] <= 1.0
    proc = run_cli("generate", "--model", str(out / "final"), "say fox", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "robot", "content": "hi"}]}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\noutput_dir: out\n")
    proc = run_cli("train", str(config))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "train.jsonl:2: field 'messages[0].role' is 'robot'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_refused(tmp_path, tiny_model_dir, sft_file):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\noutput_dir: out\n")
    proc = run_cli("train", str(config))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_pickle_weights_refused_without_flag(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    marker = tmp_path / "pwned"
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    proc = run_cli("generate", "--model", str(folder), "hi")
    assert proc.returncode == 2 and "pickle" in proc.stderr
    assert not marker.exists()


def test_example_configs_are_valid():
    from deltatune.config import load_config

    from conftest import REPO

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        assert any("deltatune " in line for line in header), f"{path.name} must start with the command that runs it"
        load_config(path)


@pytest.mark.integration
def test_real_smollm2_short_run(tmp_path):
    from deltatune.demo import orders as demo_task

    paths = demo_task.write(tmp_path / "data")
    proc = run_cli("train", str(REPO / "configs" / "sft_smollm2.yaml"), f"train_file={paths['train']}",
                   f"validation_file={paths['validation']}", f"test_file={paths['validation']}",
                   f"output_dir={tmp_path / 'out'}", "max_steps=2", "per_device_train_batch_size=2",
                   "max_new_tokens=4", "per_device_eval_batch_size=20",
                   "delta_report=false")  # the report is tested on tiny models; `make demo` runs it on this one
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "loss" in row and "event" not in row] == [2]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_chat_keeps_history_and_ends_on_empty_line(tiny_model_dir, monkeypatch, capsys):
    from deltatune import cli
    from deltatune.evaluate import generate as generation

    seen = []
    real_generate = generation.generate

    def spy(model, tok, conversations, **kw):
        seen.append([m["content"] for m in conversations[0]])
        return real_generate(model, tok, conversations, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    lines = iter(["say fox", "say dog", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3"]) == 0
    assert len(seen) == 2 and seen[1][0] == "say fox" and seen[1][-1] == "say dog" and len(seen[1]) == 3
    assert capsys.readouterr().out.count("model>") == 2
