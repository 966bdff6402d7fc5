"""torch_dtype: a bfloat16 checkpoint loads in bfloat16 and its frozen block weights stay there, computed in
float32 (trainable weights are float32); `auto` is recorded as what it became; against float32 loading the
run is the same (bf16 -> float32 is exact), only smaller."""

import json

import pytest
import torch
import yaml

from deltatune.cli import main
from deltatune.config import build_config
from deltatune.model.load import checkpoint_dtype, load_causal_lm
from deltatune.model.methods import apply_method

from conftest import chat, write_jsonl


def test_auto_is_the_checkpoints_own_dtype(bf16_model_dir, tiny_model_dir, tmp_path):
    assert checkpoint_dtype(str(bf16_model_dir)) == "bfloat16"
    assert checkpoint_dtype(str(tiny_model_dir)) == "float32"
    assert checkpoint_dtype("smollm2-135m-instruct") == "float32"  # a GGUF is dequantised to float32
    assert checkpoint_dtype(str(tmp_path / "nowhere")) == "float32"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_frozen_block_weights_stay_bfloat16_and_trainable_ones_are_float32(bf16_model_dir, method):
    model, _ = load_causal_lm(str(bf16_model_dir), dtype="bfloat16")
    args = build_config({"train_file": "t", "model": str(bf16_model_dir), "method": method}, "test").model
    model = apply_method(model, args)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(dtypes[name] == torch.float32 for name in trainable)
    frozen_linears = [n for n in dtypes if n not in trainable and n.endswith("proj.base_layer.weight")]
    assert (len(frozen_linears) == 14) == (method == "lora")  # 7 linears x 2 blocks under the adapters
    kept_low = frozen_linears + [n for n in dtypes if n not in trainable and ("embed" in n or "lm_head" in n)]
    assert all(dtypes[n] == torch.bfloat16 for n in kept_low) and (len(kept_low) == 16) == (method == "lora")
    assert all(dtypes[n] == torch.float32 for n in dtypes if n not in kept_low)  # trainable ones, norms
    ids = torch.tensor([[1, 5, 9, 3]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32
    out.loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if p.requires_grad and "lora_A" in name)


def test_a_bfloat16_checkpoint_trains_as_float32_loading_does(bf16_model_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat(f"say {w}", f"{w} {w}") for w in ["fox", "dog", "cat", "sun"] * 2])

    def run(name: str, extra: str = "") -> list[float]:
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"model: {bf16_model_dir}\nmethod: lora\ntrain_file: train.jsonl\noutput_dir: {name}\n"
                          "max_steps: 3\nper_device_train_batch_size: 2\nlearning_rate: 1.0e-2\nlogging_steps: 1\n"
                          "validation_split: 0.25\nbf16: false\nreport_to: none\nmetric: none\n" + extra)
        assert main(["train", str(config)]) == 0
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r and "event" not in r]

    stored = run("auto")
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["torch_dtype"] == "bfloat16"
    upcast = run("float32", "dtype: float32\n")  # transformers 5's name for the key
    assert yaml.safe_load((tmp_path / "float32" / "config.yaml").read_text())["torch_dtype"] == "float32"
    # The first loss is the same forward (B = 0); later ones differ by the adapters' start, which peft draws in
    # the base's dtype (rounded to bfloat16 here), as AdamW amplifies it.
    assert stored[0] == upcast[0] and stored == pytest.approx(upcast, rel=1e-3) and stored[-1] < stored[0]


def test_stored_weights_give_the_gradients_float32_weights_give(bf16_model_dir):
    grads, adapters = [], None
    for dtype in ("bfloat16", "float32"):
        model, _ = load_causal_lm(str(bf16_model_dir), dtype=dtype)
        model = apply_method(model, build_config({"train_file": "t", "method": "lora"}, "test").model)
        with torch.no_grad():
            # The same adapters on both (peft draws them in the base's dtype, so a bfloat16 base's start rounded),
            # B not 0: it would hide the frozen weights from A's gradient.
            torch.manual_seed(0)
            adapters = adapters or {n: 0.1 * torch.randn_like(p) for n, p in model.named_parameters()
                                    if p.requires_grad}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(adapters[name])
        ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("extra, message", [
    ({"torch_dtype": "bfloat16", "parallelism": "fsdp"}, "torch_dtype: bfloat16 does not work with parallelism: fsdp"),
    ({"torch_dtype": "bfloat16", "method": "lora", "frozen_weights_dtype": "float16"},
     "frozen_weights_dtype': float16 is torch_dtype: float16 now, and torch_dtype is bfloat16"),
    ({"method": "full", "frozen_weights_dtype": "float16"}, "float16 applies to method lora or dora only"),
    ({"torch_dtype": "float16", "method": "qlora"}, "does not apply to method qlora"),
    ({"torch_dtype": "bfloat16", "dtype": "float32"}, "keys 'dtype' and 'torch_dtype' name the same setting"),
])
def test_what_stored_weights_cannot_go_with_is_one_line(extra, message):
    from deltatune.errors import UserError

    with pytest.raises(UserError, match=message):
        build_config({"train_file": "t", **extra}, "test")


def test_the_old_frozen_weights_dtype_key_is_read_as_torch_dtype_with_a_note(capsys, tmp_path):
    cfg = build_config({"train_file": "t", "method": "lora", "frozen_weights_dtype": "float16"}, "run.yaml")
    assert cfg.model.torch_dtype == "float16"
    assert capsys.readouterr().err.strip() == ("run.yaml: key 'frozen_weights_dtype': read as torch_dtype: float16 "
                                               "(frozen weights now stay in float16 for the whole run, evaluation "
                                               "included); rename the key")
    # Its old default, as every config.yaml before the fold lists it, says nothing and changes nothing.
    quiet = build_config({"train_file": "t", "method": "full", "frozen_weights_dtype": "float32"}, "config.yaml")
    assert quiet.model.torch_dtype == "auto" and capsys.readouterr().err == ""
    assert "frozen_weights_dtype" not in quiet.flat()


def test_a_checkpoint_from_before_the_fold_resumes_under_its_new_name(tmp_path):
    from deltatune.errors import UserError
    from deltatune.train.checkpoint import find_resume_checkpoint

    out = tmp_path / "out"
    out.mkdir()
    cfg = build_config({"train_file": "t", "method": "lora", "torch_dtype": "float16", "output_dir": str(out),
                        "resume_from_checkpoint": "latest"}, "run.yaml")
    dumped = {**cfg.flat(), "torch_dtype": "float32", "frozen_weights_dtype": "float16"}  # as such a run wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(dumped))
    find_resume_checkpoint(cfg)  # the same run: not refused
    (out / "config.yaml").write_text(yaml.safe_dump({**dumped, "frozen_weights_dtype": "float32"}))
    with pytest.raises(UserError, match=r"holds a different run \(torch_dtype: 'float32' -> 'float16'\)"):
        find_resume_checkpoint(cfg)


def test_a_big_stored_weight_is_upcast_a_slice_at_a_time_with_the_same_result(monkeypatch):
    from deltatune.model import stored

    torch.manual_seed(0)
    weight = torch.randn(10, 6).to(torch.bfloat16)
    bias = torch.randn(10).to(torch.bfloat16)
    x = torch.randn(3, 6, requires_grad=True)
    want = torch.nn.functional.linear(x, weight.float(), bias.float())
    want.square().sum().backward()
    want_grad = x.grad.clone()
    monkeypatch.setattr(stored, "CHUNK_BYTES", 3 * 6 * 4)  # three rows at a time: four slices
    assert len(stored.row_chunks(weight, torch.float32)) == 4
    x.grad = None
    got = stored.StoredLinear.apply(x, weight, bias)
    got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-5, atol=1e-5)  # summed a slice at a time


def test_rows_of_added_tokens_train_beside_a_bfloat16_base(bf16_model_dir):
    """peft trains added tokens' rows in its own layer, which reads the weight it wraps: that one is float32."""
    from deltatune.data.templates import use_template
    from deltatune.model.methods import add_token_rows

    model, tokenizer = load_causal_lm(str(bf16_model_dir), dtype="bfloat16")
    add_token_rows(model, tokenizer, use_template(tokenizer, "llama3", None, add_missing=True))
    args = build_config({"train_file": "t", "method": "lora", "add_special_tokens": True, "chat_template": "llama3"},
                        "test").model
    model = apply_method(model, args)
    ids = torch.tensor([[1, 5, 9, len(tokenizer) - 1]])
    model(input_ids=ids, labels=ids).loss.backward()
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "embed_tokens" in n or "lm_head" in n)
    assert any(d == torch.bfloat16 for n, d in dtypes.items() if "q_proj.base_layer" in n)
