"""optimizer_in_backward: the same AdamW update, parameter by parameter during backward, so the
whole model's gradients never exist at once."""

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.config import build_config
from deltatune.data.batching import collate
from deltatune.data.examples import build_sft_examples
from deltatune.data.formats import Record
from deltatune.errors import UserError
from deltatune.evaluate.loss import causal_lm_loss
from deltatune.train.metrics_log import MetricsLog
from deltatune.train.optim import build_optimizer, optimizer_steps_in_backward

from conftest import chat, make_tiny_llama, make_tokenizer, run_fit, write_jsonl

CPU = torch.device("cpu")
WORDS = ["fox", "dog", "cat", "sun", "sky", "tea"]


def settings(tmp_path, **kw):
    base = dict(train_file="unused.jsonl", output_dir=str(tmp_path), learning_rate=1e-2, max_steps=6,
                logging_steps=1, bf16=False, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                weight_decay=0.1, warmup_steps=2, max_grad_norm=0.0, packing=False)
    return build_config({**base, **kw}, "test")


def examples(tokenizer):
    records = [Record(messages=chat(f"say {w}", f"{w} " * (1 + i % 3))["messages"], source=f"t:{i}")
               for i, w in enumerate(WORDS * 2)]
    return build_sft_examples(records, tokenizer, max_seq_length=64)[0]


def train(tmp_path, loss_fn=causal_lm_loss, **kw):
    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer, seed=5)
    log = MetricsLog(tmp_path)
    try:
        result = run_fit(model, tokenizer, examples(tokenizer), [], settings(tmp_path, **kw), tmp_path, log, CPU,
                     loss_fn=loss_fn)
    finally:
        log.close()
    return model, result


def test_same_weights_as_the_ordinary_step(tmp_path):
    """Accumulation over 2 micro-batches, weight decay on some groups, warm-up: every weight equal."""
    base = make_tiny_llama(make_tokenizer(), seed=5)
    ordinary, a = train(tmp_path / "a")
    in_backward, b = train(tmp_path / "b", optimizer_in_backward=True)
    for (name, p), q, p0 in zip(ordinary.named_parameters(), in_backward.parameters(), base.parameters()):
        assert not torch.equal(p, p0), f"{name} did not train"
        assert torch.equal(p, q), name
    losses = [r["loss"] for r in b.history if "loss" in r]
    assert losses == [r["loss"] for r in a.history if "loss" in r] and losses[-1] < losses[0]
    # The logged gradient norm is the global one the ordinary step measured.
    for r, s in zip(a.history, b.history):
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)


def test_gradients_are_freed_as_backward_goes():
    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer)
    cfg = settings("unused", optimizer_in_backward=True)
    optimizer = build_optimizer(model, cfg.train, cfg.memory.optimizer_state_dtype, cfg.seed, CPU)
    params = [p for p in model.parameters() if p.requires_grad]
    held = []  # how many gradients exist each time one is completed
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in params)))
    batch = collate(examples(tokenizer)[:4], tokenizer.pad_token_id)
    with optimizer_steps_in_backward(optimizer, True) as steps:
        for step in range(2):
            before = [p.detach().clone() for p in params]
            held.clear()
            steps.arm(True)
            loss, n = causal_lm_loss(model, batch)
            (loss / n).backward()
            if step == 0:  # no AdamW moments yet: they are allocated after backward, not on top of activations
                assert not optimizer.state and max(held) == len(params)
            else:
                assert max(held) <= 1, f"up to {max(held)} of {len(params)} gradients were held at once"
            assert steps.finish() > 0
            assert all(p.grad is None for p in params)
            assert all(not torch.equal(p, q) for p, q in zip(params, before))
    # Outside the context the hooks are gone: an ordinary backward keeps its gradients.
    causal_lm_loss(model, batch)[0].backward()
    assert all(p.grad is not None for p in params)


def test_nonfinite_loss_skips_the_update(tmp_path):
    calls = {"n": 0}

    def nan_at_step_3(model, batch):  # 2 micro-batches a step: calls 5 and 6 are step 3
        calls["n"] += 1
        loss, n = causal_lm_loss(model, batch)
        return (loss * float("nan"), n) if calls["n"] in (5, 6) else (loss, n)

    model, result = train(tmp_path, loss_fn=nan_at_step_3, optimizer_in_backward=True)
    assert result.skipped_steps == 1 and result.steps == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nonfinite_gradient_never_reaches_its_weight(tmp_path):
    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer)
    poisoned = model.model.layers[1].mlp.up_proj.weight
    before = poisoned.detach().clone()
    poisoned.register_hook(lambda grad: grad * float("nan"))
    log = MetricsLog(tmp_path)
    result = run_fit(model, tokenizer, examples(tokenizer), [],
                     settings(tmp_path, optimizer_in_backward=True, max_steps=2), tmp_path, log, CPU)
    log.close()
    assert torch.equal(poisoned, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight,
                           make_tiny_llama(tokenizer).model.layers[0].mlp.up_proj.weight)
    assert result.skipped_steps == 2  # counted as skipped: the update was not the whole step's


def test_refused_with_clipping_and_with_several_processes(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="set max_grad_norm: 0 with it"):
        build_config(dict(train_file="t.jsonl", optimizer_in_backward=True), "run.yaml")
    from deltatune.pipeline import preflight
    from deltatune.runtime import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    cfg = build_config(dict(train_file="t.jsonl", optimizer_in_backward=True, max_grad_norm=0.0,
                            output_dir=str(tmp_path / "out")), "run.yaml")
    with pytest.raises(UserError, match="one process only"):
        preflight(cfg)  # before any model is loaded or anything is written
    assert not (tmp_path / "out").exists()


def write_cli_run(tmp_path, tiny_model_dir, monkeypatch, extra_yaml: str) -> None:
    """run.yaml (6 steps, a checkpoint every 2) and its train.jsonl in tmp_path, the working directory."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [chat(f"say {w}", f"{w} {w}") for w in WORDS * 3])
    (tmp_path / "run.yaml").write_text(
        f"model: {tiny_model_dir}\ntrain_file: train.jsonl\nmax_steps: 6\nbf16: false\nmetric: none\n"
        "per_device_train_batch_size: 2\nlearning_rate: 5.0e-3\nsave_steps: 2\ndelta_report: false\n" + extra_yaml)


def killed_and_resumed_ends_as_whole(tmp_path, monkeypatch, *overrides: str) -> dict[str, torch.Tensor]:
    """Run run.yaml whole, and again killed after step 3 then resumed: the final weights must be
    bit-identical. Returns them."""
    assert main(["train", "run.yaml", *overrides, "output_dir=whole"]) == 0
    monkeypatch.setenv("DELTATUNE_TEST_KILL", "step:3:SIGTERM")
    assert main(["train", "run.yaml", *overrides, "output_dir=cut"]) == 143
    monkeypatch.delenv("DELTATUNE_TEST_KILL")
    assert main(["train", "run.yaml", *overrides, "output_dir=cut", "--resume"]) == 0
    want = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    got = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    return got


def test_cli_run_and_exact_resume(tmp_path, tiny_model_dir, monkeypatch, capsys):
    write_cli_run(tmp_path, tiny_model_dir, monkeypatch, "optimizer_in_backward: true\n")
    assert main(["train", "run.yaml"]) == 2  # clipping is on by default
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_grad_norm: 0" in err and not (tmp_path / "runs").exists()

    got = killed_and_resumed_ends_as_whole(tmp_path, monkeypatch, "max_grad_norm=0")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], got["model.layers.0.mlp.up_proj.weight"])
