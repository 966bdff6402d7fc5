"""Packing isolates examples exactly; the chunked head loss has the reference gradients;
packed training takes the same optimizer steps as unpacked training."""

import pytest
import torch
import torch.nn.functional as F

from deltatune.config import build_config
from deltatune.data.batching import collate, collate_packed, pack_rows, packed_micro_batches
from deltatune.data.examples import IGNORE_INDEX, build_sft_examples
from deltatune.data.formats import Record
from deltatune.evaluate.loss import causal_lm_loss, linear_cross_entropy
from deltatune.train.metrics_log import MetricsLog

from conftest import chat, make_tiny_llama, run_fit

CPU = torch.device("cpu")


def records(n=16):
    words = ["fox", "dog", "cat", "sun", "sky", "tea", "hello", "world"]
    return [Record(messages=chat(f"say {words[i % 8]} " * (1 + i % 4),
                                 f"{words[(i * 3) % 8]} " * (1 + i % 3))["messages"],
                   source=f"t:{i}") for i in range(n)]


@pytest.fixture
def examples(tiny_tokenizer):
    exs, _ = build_sft_examples(records(), tiny_tokenizer, max_seq_length=96)
    assert len({len(e.input_ids) for e in exs}) > 3  # varied lengths, so rows hold several examples
    return exs


def test_rows_hold_every_example_once_within_capacity(examples):
    capacity = 2 * max(len(e.input_ids) for e in examples)
    rows = pack_rows(list(range(len(examples))), examples, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in row) <= capacity for row in rows)
    assert len(rows) < len(examples)  # something was actually packed
    longest = max(len(e.input_ids) for e in examples)
    batches = packed_micro_batches(list(range(len(examples))), examples, batch_size=3, row_tokens=100)
    assert sorted(i for mb in batches for row in mb for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for row in mb for i in row) <= 3 * longest for mb in batches)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_per_example_logits(tiny_tokenizer, examples, attn):
    model = make_tiny_llama(tiny_tokenizer).eval()
    model.config._attn_implementation = attn
    capacity = 2 * max(len(e.input_ids) for e in examples)
    rows = pack_rows(list(range(len(examples))), examples, capacity)
    batch = collate_packed([[examples[i] for i in row] for row in rows], tiny_tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no [rows, L, L] mask is built here
    with torch.no_grad():  # as training runs: the positions alone isolate the examples
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        checked = 0
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ids = torch.tensor([examples[i].input_ids])
                alone = model(input_ids=ids, use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, start: start + ids.shape[1]], alone, atol=1e-5, rtol=0)
                start += ids.shape[1]
                checked += 1
    assert checked == len(examples) and any(len(row) > 1 for row in rows)


def test_packed_loss_equals_unpacked_loss_and_counts(tiny_tokenizer, examples):
    model = make_tiny_llama(tiny_tokenizer)
    rows = pack_rows(list(range(len(examples))), examples, 2 * max(len(e.input_ids) for e in examples))
    packed_sum, packed_n = causal_lm_loss(model, collate_packed([[examples[i] for i in r] for r in rows],
                                                               tiny_tokenizer.pad_token_id))
    plain_sum, plain_n = causal_lm_loss(model, collate(examples, tiny_tokenizer.pad_token_id))
    assert int(packed_n) == int(plain_n) == sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)
    torch.testing.assert_close(packed_sum, plain_sum, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("chunk_elements", [10**9, 400 * 7])  # one chunk; several uneven chunks
def test_chunked_head_loss_gradients_equal_reference(chunk_elements):
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(400, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 400, (23,))
    ours = linear_cross_entropy(hidden, weight, targets, max_chunk_elements=chunk_elements)
    (ours * 0.37).backward()  # a non-unit upstream gradient, as loss / step_tokens gives
    g_ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (reference * 0.37).backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(g_ours[0], hidden.grad)
    torch.testing.assert_close(g_ours[1], weight.grad)


@pytest.mark.parametrize("chunk_elements", [10**9, 400 * 7])
def test_chunked_head_loss_frozen_head_gives_hidden_gradient_only(chunk_elements):
    # LoRA and frozen heads: no weight gradient is computed, the hidden one is still exact.
    torch.manual_seed(1)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(400, 16, dtype=torch.float64)
    targets = torch.randint(0, 400, (23,))
    (linear_cross_entropy(hidden, weight, targets, max_chunk_elements=chunk_elements) * 0.37).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    (F.cross_entropy(hidden @ weight.t(), targets, reduction="sum") * 0.37).backward()
    torch.testing.assert_close(ours, hidden.grad)
    assert weight.grad is None


def test_chunked_head_loss_upcasts_a_bf16_head_a_slice_of_rows_at_a_time(monkeypatch):
    # torch_dtype: a frozen 128k-token head kept in bfloat16 is never upcast whole (a GB in float32).
    from deltatune.model import stored

    monkeypatch.setattr(stored, "CHUNK_BYTES", 64 * 16 * 4)  # 64 rows of 16 float32 at a time: 7 slices of 400
    torch.manual_seed(2)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(400, 16).to(torch.bfloat16)
    targets = torch.randint(0, 400, (23,))
    seen = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda parts, **kw: seen.append(len(parts)) or real_cat(parts, **kw))
    (linear_cross_entropy(hidden, weight, targets, max_chunk_elements=400 * 7) * 0.37).backward()
    assert seen and set(seen) == {7}  # every chunk's logits came from 7 upcast slices
    ours = hidden.grad.clone()
    hidden.grad = None
    reference = F.cross_entropy(hidden @ weight.float().t(), targets, reduction="sum")
    (reference * 0.37).backward()
    torch.testing.assert_close(ours, hidden.grad)


def test_chunked_head_loss_of_no_rows_is_zero_with_zero_gradients():
    # Under several processes a rank can get a blank micro-batch: it still takes part in backward.
    hidden = torch.zeros(0, 16, requires_grad=True)
    weight = torch.randn(400, 16, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_chunked_head_loss_refuses_a_second_backward_instead_of_scaling_twice():
    # Its gradients are computed in forward and scaled in place in backward (no second copy).
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.zeros(5, dtype=torch.long)) * 0.5
    loss.backward(retain_graph=True)
    with pytest.raises(AttributeError):
        loss.backward()


def test_chunked_head_loss_needs_no_grad_in_eval():
    hidden, weight = torch.randn(5, 8), torch.randn(50, 8)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), torch.zeros(5, dtype=torch.long),
                                                     reduction="sum"))


def _train(tokenizer, examples, tmp_path, name, **kw):
    model = make_tiny_llama(tokenizer, seed=1)
    base = dict(train_file="unused.jsonl", output_dir=str(tmp_path), learning_rate=1e-2, num_train_epochs=2,
                logging_steps=1, bf16=False, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                warmup_steps=0, max_grad_norm=1.0, weight_decay=0.1)
    (tmp_path / name).mkdir()
    log = MetricsLog(tmp_path / name)
    result = run_fit(model, tokenizer, examples, examples[:3], build_config({**base, **kw}, "test"), tmp_path, log, CPU)
    log.close()
    return model, result


@pytest.mark.parametrize("other", [dict(packing=True), dict(packing=True, gradient_checkpointing=True)],
                         ids=["packed", "packed+checkpointing"])
def test_packed_training_takes_the_same_steps_as_unpacked(tiny_tokenizer, examples, tmp_path, other):
    before = {n: p.detach().clone() for n, p in make_tiny_llama(tiny_tokenizer, seed=1).named_parameters()}
    plain, plain_result = _train(tiny_tokenizer, examples, tmp_path, "plain", packing=False)
    packed, packed_result = _train(tiny_tokenizer, examples, tmp_path, "packed", **other)
    assert packed_result.steps == plain_result.steps and packed_result.trained_tokens == plain_result.trained_tokens
    for (name, a), b in zip(plain.named_parameters(), packed.parameters()):
        assert not torch.equal(a, before[name]), f"{name} did not train"
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)
    losses = [r["loss"] for r in packed_result.history if "loss" in r]
    assert losses[-1] < losses[0]


def _step_gradients(tokenizer, examples, group, batch_size, packing):
    from deltatune.data.batching import micro_batches

    model = make_tiny_llama(tokenizer, seed=1)
    if packing:
        batches = [collate_packed([[examples[i] for i in row] for row in mb], tokenizer.pad_token_id)
                   for mb in packed_micro_batches(group, examples, batch_size)]
    else:
        batches = [collate([examples[i] for i in mb], tokenizer.pad_token_id)
                   for mb in micro_batches(group, examples, batch_size)]
    step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    for batch in batches:
        loss_sum, _ = causal_lm_loss(model, batch)
        (loss_sum / step_tokens).backward()
    return len(batches), {n: p.grad for n, p in model.named_parameters()}


def test_packed_accumulation_gives_the_step_gradient_of_one_big_unpacked_batch(tiny_tokenizer, examples):
    """Same step, any micro-batching, packed or not: the same gradient (float rounding only)."""
    group = list(range(8))
    _, reference = _step_gradients(tiny_tokenizer, examples, group, 8, packing=False)
    for batch_size in (8, 2, 1):
        n_batches, grads = _step_gradients(tiny_tokenizer, examples, group, batch_size, packing=True)
        assert batch_size == 8 or n_batches > 1
        for name, g in grads.items():
            assert g is not None and g.abs().sum() > 0, name
            torch.testing.assert_close(g, reference[name], atol=1e-7, rtol=1e-5, msg=name)
