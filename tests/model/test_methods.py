"""Methods: exactly the chosen parameters train; everything else stays bit-identical."""

import re

import pytest
import torch

from deltatune.config import build_config
from deltatune.data.examples import build_sft_examples
from deltatune.data.formats import Record
from deltatune.errors import UserError
from deltatune.model.methods import apply_method, trainable_summary
from deltatune.pipeline import preflight
from deltatune.train.metrics_log import MetricsLog

from conftest import chat, make_tiny_llama, run_fit

CPU = torch.device("cpu")


def sft_examples(tokenizer):
    words = ["fox", "dog", "cat", "sun", "sky", "tea"]
    records = [Record(messages=chat(f"say {w}", f"{w} {w}")["messages"], source=f"t:{i}")
               for i, w in enumerate(words * 2)]
    return build_sft_examples(records, tokenizer, max_seq_length=64)[0]


def cfg(tmp_path, **kw):
    base = dict(train_file="unused.jsonl", output_dir=str(tmp_path), learning_rate=1e-2, max_steps=4,
                logging_steps=1, bf16=False, per_device_train_batch_size=4, weight_decay=0.1)
    return build_config({**base, **kw}, "test")


def train_and_compare(tokenizer, tmp_path, **method):
    """Apply a method, fit a few steps; return (model, {name: (trainable, changed)}) keyed by base names."""
    config = cfg(tmp_path, **method)
    model = apply_method(make_tiny_llama(tokenizer), config.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    log = MetricsLog(tmp_path)
    run_fit(model, tokenizer, sft_examples(tokenizer), [], config, tmp_path, log, CPU)
    log.close()
    return model, {n: (n in trainable, not torch.equal(before[n], p)) for n, p in model.named_parameters()}


def assert_exactly_trainable_changed(states):
    for name, (trainable, changed) in states.items():
        assert trainable == changed, f"{name}: trainable={trainable} but changed={changed}"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_train_only_adapter_weights_of_every_block_linear(tiny_tokenizer, tmp_path, method):
    model, states = train_and_compare(tiny_tokenizer, tmp_path, method=method, lora_r=4)
    assert_exactly_trainable_changed(states)
    trained = [n for n, (t, _) in states.items() if t]
    assert trained and all("lora_" in n for n in trained)
    # Every linear layer of both blocks has an adapter; the output head does not.
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert any(re.search(rf"layers\.{layer}\..*{proj}\.lora_A", n) for n in trained), (layer, proj)
    assert not any("lm_head" in n or "embed" in n for n in trained)
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in trained)
    cfg_used = model.peft_config["default"]
    assert cfg_used.r == 4 and cfg_used.lora_alpha == 8  # alpha defaults to 2r


def test_lora_target_modules_override(tiny_tokenizer, tmp_path):
    _, states = train_and_compare(tiny_tokenizer, tmp_path, method="lora", lora_target_modules=["q_proj", "v_proj"])
    assert_exactly_trainable_changed(states)
    modules = {n.split(".lora_")[0].rsplit(".", 1)[1] for n, (t, _) in states.items() if t}
    assert modules == {"q_proj", "v_proj"}


def test_head_only_trains_the_lm_head_alone(tiny_tokenizer, tmp_path):
    _, states = train_and_compare(tiny_tokenizer, tmp_path, method="head_only")
    assert_exactly_trainable_changed(states)
    assert [n for n, (t, _) in states.items() if t] == ["lm_head.weight"]


def test_freeze_layers_keeps_bottom_blocks_and_embeddings_frozen(tiny_tokenizer, tmp_path):
    _, states = train_and_compare(tiny_tokenizer, tmp_path, method="freeze", freeze_layers=1)
    assert_exactly_trainable_changed(states)
    trained = {n for n, (t, _) in states.items() if t}
    assert not any(n.startswith("model.layers.0.") for n in trained)
    assert "model.embed_tokens.weight" not in trained
    assert {"model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"} <= trained


def test_trainable_modules_regexes(tiny_tokenizer, tmp_path):
    _, states = train_and_compare(tiny_tokenizer, tmp_path, method="freeze",
                                  trainable_modules=[r"mlp\.down_proj", r"embed_tokens"])
    assert_exactly_trainable_changed(states)
    trained = {n for n, (t, _) in states.items() if t}
    assert trained == {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                       "model.layers.1.mlp.down_proj.weight"}


def test_trainable_summary_groups_blocks_into_ranges(tiny_tokenizer, tmp_path):
    model = apply_method(make_tiny_llama(tiny_tokenizer),
                         cfg(tmp_path, method="lora", lora_target_modules=["q_proj"]).model)
    summary = trainable_summary(model)
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.groups == ["model.layers.[0-1].self_attn.q_proj (lora)"]


def test_bad_method_settings_are_user_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(UserError, match="only apply to method lora"):
        cfg(tmp_path, lora_r=8)
    with pytest.raises(UserError, match="freeze_layers"):
        cfg(tmp_path, method="lora", freeze_layers=1)
    with pytest.raises(UserError, match="more than the model's 2 blocks"):
        apply_method(make_tiny_llama(tiny_tokenizer), cfg(tmp_path, method="freeze", freeze_layers=3).model)
    with pytest.raises(UserError, match="match no parameter"):
        apply_method(make_tiny_llama(tiny_tokenizer),
                     cfg(tmp_path, method="freeze", trainable_modules=["nothing_here"]).model)


def test_qlora_without_cuda_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(UserError, match="CUDA GPU"):
        preflight(build_config({"train_file": "t.jsonl", "method": "qlora", "output_dir": str(tmp_path)}, "run.yaml"))
