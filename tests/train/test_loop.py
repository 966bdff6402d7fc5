"""The training loop: parameters move, the loss falls, accumulation is exact, schedules are right."""

import json

import pytest
import torch

from deltatune.config import build_config
from deltatune.data.batching import collate, length_batches, micro_batches
from deltatune.data.examples import build_sft_examples
from deltatune.data.formats import Record
from deltatune.evaluate.loss import causal_lm_loss, mean_loss
from deltatune.train.loop import accumulate_gradients
from deltatune.train.metrics_log import MetricsLog
from deltatune.train.optim import lr_lambda
from deltatune.train.trackers import TensorBoard

from conftest import chat, make_tiny_llama, run_fit

CPU = torch.device("cpu")


def records(n=16):
    words = ["fox", "dog", "cat", "sun", "sky", "tea", "hello", "world"]
    return [Record(messages=chat(f"say {words[i % 8]}", f"{words[i % 8]} " * (1 + i % 3))["messages"], source=f"t:{i}")
            for i in range(n)]


def cfg(tmp_path, **kw):
    base = dict(train_file="unused.jsonl", output_dir=str(tmp_path), learning_rate=1e-2, num_train_epochs=1,
                logging_steps=1, bf16=False, per_device_train_batch_size=8, warmup_steps=0, max_grad_norm=0.0)
    return build_config({**base, **kw}, "test")


def test_full_finetune_changes_every_parameter_and_loss_falls(tiny_tokenizer, tmp_path):
    model = make_tiny_llama(tiny_tokenizer)
    examples, _ = build_sft_examples(records(), tiny_tokenizer, max_seq_length=64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = MetricsLog(tmp_path, [TensorBoard(tmp_path, None)])
    result = run_fit(model, tiny_tokenizer, examples, examples[:4], cfg(tmp_path, num_train_epochs=8), tmp_path,
                     log, CPU)
    log.close()
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p), f"{name} did not change"
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in lines) and sum("loss" in row for row in lines) == result.steps
    assert list((tmp_path / "tensorboard").iterdir())


def test_frozen_parameters_stay_bit_identical(tiny_tokenizer, tmp_path):
    model = make_tiny_llama(tiny_tokenizer)
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = model.model.embed_tokens.weight.detach().clone()
    examples, _ = build_sft_examples(records(), tiny_tokenizer, max_seq_length=64)
    log = MetricsLog(tmp_path)
    run_fit(model, tiny_tokenizer, examples, [], cfg(tmp_path, weight_decay=0.1), tmp_path, log, CPU)
    log.close()
    assert torch.equal(frozen, model.model.embed_tokens.weight)


def test_accumulated_gradients_equal_one_big_batch(tiny_tokenizer):
    """The gradient of batch 8 equals 4 accumulated micro-batches of 2 (uneven label counts)."""
    examples, _ = build_sft_examples(records(8), tiny_tokenizer, max_seq_length=64)
    assert len({sum(label != -100 for label in e.labels) for e in examples}) > 1
    grads = []
    for size in (8, 2):
        model = make_tiny_llama(tiny_tokenizer, seed=1)
        batches = [collate([examples[i] for i in mb], tiny_tokenizer.pad_token_id)
                   for mb in micro_batches(list(range(8)), examples, size)]
        accumulate_gradients(model, batches, causal_lm_loss, CPU, bf16=False)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_token_budget_batches_bound_padded_tokens_and_keep_the_loss(tiny_tokenizer):
    """A token cap splits long examples into smaller batches; every example is scored once, same loss."""
    examples, _ = build_sft_examples(records(16), tiny_tokenizer, max_seq_length=64)
    longest = max(len(e.input_ids) for e in examples)
    cap = 3 * longest
    batches = length_batches(examples, 8, max_tokens=cap)
    assert sorted(i for b in batches for i in b) == list(range(16))
    assert all(len(b) * max(len(examples[i].input_ids) for i in b) <= cap for b in batches)
    assert len(batches) > len(length_batches(examples, 8))  # the cap did something
    assert micro_batches(list(range(16)), examples, 8, max_tokens=cap) == batches
    model = make_tiny_llama(tiny_tokenizer, seed=1)
    capped = mean_loss(model, examples, 8, tiny_tokenizer.pad_token_id, CPU, max_tokens=cap)
    plain = mean_loss(model, examples, 8, tiny_tokenizer.pad_token_id, CPU)
    assert capped[1] == plain[1]
    assert capped[0] == pytest.approx(plain[0], rel=1e-6)


def test_gradient_accumulation_gives_the_same_training_run(tiny_tokenizer, tmp_path):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4 through run_fit(), two optimizer steps."""
    examples, _ = build_sft_examples(records(16), tiny_tokenizer, max_seq_length=64)
    lr = 1e-3
    weights = []
    for batch, accum in ((8, 1), (2, 4)):
        model = make_tiny_llama(tiny_tokenizer, seed=1)
        log = MetricsLog(tmp_path / f"{batch}x{accum}")
        run_fit(model, tiny_tokenizer, examples, [], cfg(tmp_path, per_device_train_batch_size=batch, learning_rate=lr,
                                                     gradient_accumulation_steps=accum, max_grad_norm=1.0,
                                                     packing=False),  # packed steps: test_packing.py
            tmp_path, log, CPU)
        log.close()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in weights[0]:
        # Gradients match to float tolerance (test above). Adam divides by sqrt(v), so an entry whose
        # gradient is ~0 can flip sign under rounding and move by up to lr per step: allow that for
        # a handful of entries, demand float equality for the rest.
        diff = (weights[0][name] - weights[1][name]).abs()
        assert (diff > 1e-6).float().mean() < 1e-3, name
        assert diff.max() <= 2 * 2 * lr, name


def test_loss_at_label_positions_equals_reference(tiny_tokenizer):
    """Our head-at-label-positions loss equals transformers' own loss on the same labels."""
    model = make_tiny_llama(tiny_tokenizer)
    examples, _ = build_sft_examples(records(4), tiny_tokenizer, max_seq_length=64)
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    ours, n = causal_lm_loss(model, batch)
    reference = model(**batch).loss
    torch.testing.assert_close(ours / n, reference)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(kind):
    f = lr_lambda(kind, warmup=4, total=20)
    assert f(0) < f(1) < f(3) <= 1.0
    assert f(4) == pytest.approx(1.0)
    if kind == "constant":
        assert f(19) == 1.0
    else:
        assert f(19) < 0.1 and f(10) < 1.0


def test_early_stopping_keeps_best_weights(tiny_tokenizer, tmp_path):
    model = make_tiny_llama(tiny_tokenizer)
    train, _ = build_sft_examples(records(), tiny_tokenizer, max_seq_length=64)
    # Validation data unlike the training data: its loss rises as the model overfits.
    val_records = [Record(messages=chat("say sky", "world hello tea")["messages"], source="v:1")]
    val, _ = build_sft_examples(val_records, tiny_tokenizer, max_seq_length=64)
    log = MetricsLog(tmp_path)
    result = run_fit(model, tiny_tokenizer, train, val, cfg(tmp_path, num_train_epochs=40, eval_steps=1,
                                                      early_stopping_patience=2, learning_rate=3e-2),
                     tmp_path, log, CPU)
    log.close()
    assert result.stopped_early and result.steps < 80
    from deltatune.evaluate.loss import mean_loss
    final, _ = mean_loss(model, val, 8, tiny_tokenizer.pad_token_id, CPU)
    assert final == pytest.approx(result.best_eval_loss, rel=1e-5)
