"""frozen_weights_dtype: frozen LoRA/DoRA base weights stored in float16/bfloat16 while training,
computed in float32, never kept as float32 copies for backward, restored bit for bit after fit."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deltatune import pipeline
from deltatune.cli import main
from deltatune.config import build_config
from deltatune.errors import UserError
from deltatune.model.methods import apply_method
from deltatune.model.stored import DTYPES
from deltatune.train import frozen_weights as lowp

from conftest import chat, make_tiny_llama, make_tokenizer, run_cli, write_jsonl


def adapted_tiny_llama(method: str, lora_dropout: float = 0.0):
    """A tiny Llama with adapters whose B is random: the adapters change the output, so the
    gradients of A and B (and DoRA's magnitude) all depend on the frozen weights."""
    tokenizer = make_tokenizer()
    model = apply_method(make_tiny_llama(tokenizer), build_config(
        {"train_file": "t", "method": method, "lora_r": 4, "lora_dropout": lora_dropout}, "test").model)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train(), torch.randint(0, len(tokenizer), (3, 11))


def logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# Rounding a weight to float16 changes it by at most 2^-11 of its value (11 significant bits),
# bfloat16 by 2^-8. Each output of a 2-layer model mixes several rounded weights, and errors of
# independent roundings partly cancel: 8x the unit roundoff bounds the relative error of logits
# and gradients with room to spare; a compute-dtype bug (half-precision matmuls, a dropped bias,
# a wrong transpose) gives errors far above that.
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype_name,unit_roundoff", [("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)])
def test_stored_weights_give_float32_logits_and_gradients_within_rounding(method, dtype_name, unit_roundoff):
    reference, ids = adapted_tiny_llama(method)
    stored = copy.deepcopy(reference)
    assert lowp.store_frozen_weights(stored, dtype_name) == 14  # 7 linears in each of 2 blocks
    dtype = DTYPES[dtype_name]
    assert {linear.weight.dtype for linear in lowp.adapter_base_linears(stored).values()} == {dtype}
    # Nothing else changed dtype: embeddings, norms, head and the adapters stay float32.
    others = {p.dtype for n, p in stored.named_parameters() if ".base_layer." not in n}
    assert others == {torch.float32}

    want_logits, want_grads = logits_and_grads(reference, ids)
    got_logits, got_grads = logits_and_grads(stored, ids)
    assert got_logits.dtype == torch.float32  # computed in the activation dtype
    assert 0 < relative_error(got_logits, want_logits) < 8 * unit_roundoff  # > 0: the storage did change
    assert want_grads.keys() == got_grads.keys() and all("lora" in n for n in got_grads)
    for name in want_grads:
        assert relative_error(got_grads[name], want_grads[name]) < 8 * unit_roundoff, name
    assert any(not torch.equal(got_grads[n], want_grads[n]) for n in want_grads)
    assert all(p.grad is None for n, p in stored.named_parameters() if ".base_layer." in n)  # frozen


def weights_saved_for_backward(model, ids) -> tuple[int, int]:
    """(frozen base weights autograd keeps for backward as they are, float32 copies of one it keeps):
    a copy is of the weight or its transpose (what a matmul saves), memory the cheaper storage
    was meant to free."""
    weights = [linear.weight for linear in lowp.adapter_base_linears(model).values()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(input_ids=ids).logits.sum()

    def is_copy(t):
        return t.dtype == torch.float32 and any(
            t.shape == w.shape and t.data_ptr() != w.data_ptr() and torch.equal(t, w.float())
            for weight in weights for w in (weight, weight.t()))
    return sum(any(t.data_ptr() == w.data_ptr() for w in weights) for t in saved), sum(is_copy(t) for t in saved)


def test_backward_keeps_the_low_precision_weight_not_a_float32_copy():
    model, ids = adapted_tiny_llama("lora")
    lowp.store_frozen_weights(model, "float16")
    assert weights_saved_for_backward(model, ids) == (11, 0)  # all but layer 0's q/k/v (their input needs no grad)
    # The same check catches the obvious implementation, which upcasts in front of F.linear:
    # autograd then holds every layer's float32 copy until backward.
    for linear in lowp.adapter_base_linears(model).values():
        linear.forward = lambda x, linear=linear: F.linear(x, linear.weight.float(), linear.bias)
    assert weights_saved_for_backward(model, ids) == (0, 11)


def test_dora_with_dropout_would_keep_float32_copies_so_the_config_refuses_it(tmp_path):
    model, ids = adapted_tiny_llama("dora", lora_dropout=0.1)
    lowp.store_frozen_weights(model, "float16")
    assert weights_saved_for_backward(model, ids)[1] > 0  # peft's DoRA recomputes the base output from a copy
    with pytest.raises(UserError, match="frozen_weights_dtype: float16 with method dora needs lora_dropout: 0"):
        build_config({"train_file": "t", "method": "dora", "lora_dropout": 0.1, "frozen_weights_dtype": "float16"},
                     "run.yaml")


@pytest.mark.parametrize("raw,message", [
    ({"method": "full"}, "frozen_weights_dtype: float16 applies to method lora or dora only .method is 'full'"),
    ({"method": "head_only"}, "applies to method lora or dora only"),
    ({"method": "lora", "parallelism": "fsdp"}, "does not work with parallelism: fsdp"),
])
def test_config_refuses_stored_weights_where_they_cannot_work(raw, message):
    with pytest.raises(UserError, match=message):
        build_config({"train_file": "t", "frozen_weights_dtype": "float16", **raw}, "run.yaml")
    assert build_config({"train_file": "t", **raw}, "run.yaml").memory.frozen_weights_dtype == "float32"  # the default


def write_run(root, model_dir, extra: str = ""):
    write_jsonl(root / "train.jsonl",
                [chat(f"say {w}", f"{w} {w}") for w in ["fox", "dog", "cat", "sun", "sky", "tea"] * 4])
    config = root / "run.yaml"
    config.write_text(f"model: {model_dir}\ntrain_file: train.jsonl\noutput_dir: out\nmethod: lora\nlora_r: 4\n"
                      "learning_rate: 2e-2\nmax_steps: 6\nper_device_train_batch_size: 4\nlogging_steps: 1\n"
                      f"bf16: false\nmetric: none\nfrozen_weights_dtype: float16\n{extra}")
    return config


def test_cli_run_trains_on_float16_storage_and_evaluates_on_the_exact_float32_weights(
        tmp_path, tiny_model_dir, monkeypatch):
    # (where, {base weight name: tensor}) at the base evaluation, at the start of fit, at the tuned evaluation
    seen = []

    def base_weights(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}

    def spy_evaluate(model, task, *args, **kwargs):
        seen.append(("evaluate", base_weights(model)))
        return real_evaluate(task, model, *args, **kwargs)

    def spy_fit(model, *args, **kwargs):
        seen.append(("fit", base_weights(model)))
        return real_fit(model, *args, **kwargs)
    real_evaluate, real_fit = pipeline.evaluate_model, pipeline.fit
    monkeypatch.setattr(pipeline, "evaluate_model", lambda task, model, *a, **k: spy_evaluate(model, task, *a, **k))
    monkeypatch.setattr(pipeline, "fit", spy_fit)

    assert main(["train", str(write_run(tmp_path, tiny_model_dir))]) == 0
    assert [where for where, _ in seen] == ["evaluate", "fit", "evaluate"]
    (_, before), (_, training), (_, after) = seen
    assert len(training) == 14 and {t.dtype for t in training.values()} == {torch.float16}
    original = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in after.items():
        want = original[name.removeprefix("base_model.model.").replace(".base_layer", "")]
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want), name  # restored bit for bit
        assert torch.equal(before[name], want)
        assert not torch.equal(training[name].float(), want)  # float16 did round them

    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and "event" not in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # The adapter folder holds the adapter alone, in float32, and LoRA B has left its zero start.
    adapter = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    assert len(adapter) == 28 and all(".lora_A." in n or ".lora_B." in n for n in adapter)
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert all(t.abs().sum() > 0 for n, t in adapter.items() if ".lora_B." in n)
    assert (tmp_path / "out" / "report.md").is_file()  # the delta report ran on the restored model


def test_resume_with_float16_storage_ends_where_an_uninterrupted_run_does(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    extra = "save_steps: 3\ndelta_report: false\n"
    reference, resumed = (write_run(tmp_path / "a", tiny_model_dir, extra),
                          write_run(tmp_path / "b", tiny_model_dir, extra))
    assert main(["train", str(reference)]) == 0
    monkeypatch.setenv("DELTATUNE_TEST_KILL", "step:4:SIGTERM")  # stop after step 4: checkpoint-4
    assert main(["train", str(resumed)]) == 143
    monkeypatch.delenv("DELTATUNE_TEST_KILL")
    assert main(["train", str(resumed), "--resume"]) == 0
    want = load_file(tmp_path / "a" / "out" / "final" / "adapter_model.safetensors")
    got = load_file(tmp_path / "b" / "out" / "final" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


def test_two_ddp_processes_train_on_float16_storage(tmp_path, tiny_model_dir):
    config = write_run(tmp_path, tiny_model_dir,
                       "per_device_train_batch_size: 2\nparallelism: ddp\ndelta_report: false\n")
    proc = run_cli("train", "--nproc", "2", str(config), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 0 prints
    assert proc.stdout.count("frozen_weights_dtype: float16 storage for the 14 frozen linear layers") == 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and "event" not in r]
    assert [r["world_size"] for r in rows if r.get("event") == "start"] == [2] and losses[-1] < losses[0]
    adapter = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    assert len(adapter) == 28 and all(t.abs().sum() > 0 for n, t in adapter.items() if ".lora_B." in n)
