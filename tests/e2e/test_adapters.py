"""Adapter runs from the CLI: a PEFT adapter in final/, merge to a full model, eval/generate on adapters."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune.cli import main as cli_main

from conftest import chat, run_cli, write_jsonl


def test_lora_run_saves_peft_adapter_that_merges_to_same_logits(tmp_path, tiny_model_dir, sft_file, capsys):
    from peft import PeftModel

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\noutput_dir: out\nmethod: lora\nlora_r: 4\n"
                      "learning_rate: 2e-2\nmax_steps: 6\nper_device_train_batch_size: 4\nbf16: false\n")
    proc = run_cli("train", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "trainable parameters:" in proc.stdout and "(lora)" in proc.stdout
    final = tmp_path / "out" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "config.json").exists()
    assert (final / "tokenizer_config.json").is_file()
    method = next(json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
                  if '"method"' in line)
    assert method["method"] == "lora" and 0 < method["trainable_parameters"] < method["total_parameters"]

    # Plain peft loads the adapter onto the base model.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = AutoTokenizer.from_pretrained(final)("say fox and dog", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, final).eval()
        adapter_logits = adapted(ids).logits
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-4)  # the adapter learned something

    assert cli_main(["merge", "--adapter", str(final), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_logits, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template

    # eval and generate take the adapter folder directly (the base is found from adapter_config.json).
    test = write_jsonl(tmp_path / "test.jsonl", [chat("say fox", "fox fox")])
    assert cli_main(["eval", "--model", str(final), "--data", str(test), "--out", str(tmp_path / "e.json"),
                     "--max-new-tokens", "4"]) == 0
    assert "loss" in json.loads((tmp_path / "e.json").read_text())
    assert cli_main(["generate", "--model", str(final), "say fox", "--max-new-tokens", "4"]) == 0

    assert cli_main(["merge", "--adapter", str(tiny_model_dir), "--out", str(tmp_path / "m2")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
