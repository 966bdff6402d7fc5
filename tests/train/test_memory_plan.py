"""The memory plan: counted on a meta-device model with the run's own method, so its trainable count and weight
bytes are those the loaded model has; `deltatune plan` prints it; a run that would not fit is refused before
anything loads or is written, and `force` runs it anyway. (How close the peak is to a measured one is
benchmarks/scale.py's question, not a unit test's.)"""

import re

import pytest
import torch

from deltatune.cli import main
from deltatune.config import build_config
from deltatune.model.load import load_causal_lm
from deltatune.model.methods import apply_method
from deltatune.runtime import plan as memory
from deltatune.tasks import TASKS


@pytest.mark.parametrize("settings", [{"method": "lora"}, {"method": "full"}, {"method": "head_only"},
                                      {"method": "freeze", "freeze_layers": 1}, {"method": "lora",
                                                                                 "torch_dtype": "float32"}])
def test_the_plan_counts_what_the_loaded_model_holds(bf16_model_dir, settings):
    cfg = build_config({"train_file": "t", "model": str(bf16_model_dir), **settings}, "test")
    counts = memory.count_parameters(cfg, TASKS["sft"])
    model, _ = load_causal_lm(str(bf16_model_dir), dtype=settings.get("torch_dtype", "bfloat16"))
    model = apply_method(model, cfg.model)
    unique = {id(p): p for p in model.parameters()}.values()
    assert counts.trainable == sum(p.numel() for p in unique if p.requires_grad) > 0
    assert counts.total == sum(p.numel() for p in unique)
    assert counts.weight_bytes == sum(p.numel() * p.element_size() for p in unique)
    assert counts.layers == {"head_only": 0, "freeze": 1}.get(settings["method"], 2)  # blocks backward runs through


def test_gradients_moments_and_activations_follow_the_settings(bf16_model_dir):
    def parts(**settings) -> dict:
        cfg = build_config({"train_file": "t", "model": str(bf16_model_dir), "method": "full", **settings}, "test")
        return dict(memory.plan_memory(cfg, TASKS["sft"], torch.device("cpu"), bf16=False).parts)
    full = parts()
    trainable = full["gradients (float32, trainable)"] // 4
    assert full["AdamW moments (float32)"] == 8 * trainable
    assert parts(optimizer_state_dtype="bfloat16")["AdamW moments (bfloat16)"] == 4 * trainable
    assert parts(gradient_checkpointing=True)["activations (checkpointed)"] < full["activations"]
    assert parts(max_seq_length=2048)["activations"] > 4 * parts(max_seq_length=512)["activations"]  # the scores
    sharded = build_config({"train_file": "t", "model": str(bf16_model_dir), "method": "full", "parallelism": "fsdp"},
                           "test")
    halves = dict(memory.plan_memory(sharded, TASKS["sft"], torch.device("cpu"), False, world=2).parts)
    assert halves["gradients (float32, trainable)"] == full["gradients (float32, trainable)"] // 2
    cfg = build_config({"train_file": "t", "model": str(bf16_model_dir), "method": "full"}, "test")
    pairs = dict(memory.plan_memory(cfg, TASKS["preference"], torch.device("cpu"), False).parts)
    assert pairs["activations"] == 2 * full["activations"]  # a pair's chosen and rejected sides are two rows


def test_deltatune_plan_prints_the_parts_and_ends_with_the_peak(bf16_model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {bf16_model_dir}\nmethod: lora\ntrain_file: train.jsonl\n")
    assert main(["plan", str(config)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("memory plan (host memory (RSS)") and any("weights as stored" in x for x in lines)
    assert re.fullmatch(r"peak: \d+\.\d GB", lines[-1])
    assert list(tmp_path.iterdir()) == [config]  # nothing written

    assert main(["plan", str(config), "per_device_train_batch_size=4096", "max_seq_length=8192"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "but the device has" in lines[-2] and "gradient_checkpointing: true" in lines[-2]


def test_a_run_that_does_not_fit_is_refused_before_anything_loads_unless_forced(bf16_model_dir, tmp_path,
                                                                                monkeypatch, capsys):
    from deltatune import pipeline

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {bf16_model_dir}\nmethod: full\ntrain_file: {tmp_path / 'missing.jsonl'}\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    monkeypatch.setattr(memory, "device_total", lambda device: 10**6)  # a 1 MB device
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GB of host memory (RSS) but the device has 0.0 GB" in err
    assert "method: lora" in err and "--force" in err
    assert not (tmp_path / "out").exists()
    cfg = build_config({"train_file": "t", "model": str(bf16_model_dir), "method": "full"}, "test")
    pipeline.check_memory(cfg, torch.device("cpu"), False, force=True)  # forced: no refusal
    assert "memory plan: peak" in capsys.readouterr().out
