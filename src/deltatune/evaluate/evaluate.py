"""Evaluate a model on held-out data: loss, perplexity and a task metric from greedy generation;
for a classifier, loss and accuracy, macro-F1, per-class scores and the confusion matrix.

Everything streams in batches: the loss is summed as it goes and generated text is kept,
logits never are, so memory stays bounded whatever the data size.
"""

from __future__ import annotations

import math

import torch

from deltatune.data.batching import collate, length_batches
from deltatune.data.examples import Example
from deltatune.data.formats import Record
from deltatune.evaluate.generate import generate
from deltatune.evaluate.loss import class_targets, classification_loss, classifier_inputs, evaluation_mode, mean_loss
from deltatune.evaluate.metrics import Check, classification_metrics
from deltatune.runtime.precision import autocast


def references(records: list[Record]) -> list[str]:
    return [r.messages[-1]["content"] for r in records]


def evaluate(model, tokenizer, *, loss_examples: list[Example] | None, metric_records: list[Record] | None,
             metric: str = "exact_match", batch_size: int = 8, max_new_tokens: int = 64,
             device: torch.device, bf16: bool = False, keep_predictions: int = 0, check: Check | None = None,
             max_tokens: int | None = None) -> dict:
    """{loss, perplexity, tokens, <metric>, predictions[:keep_predictions]} for one model."""
    result: dict = {}
    if loss_examples:
        loss, tokens = mean_loss(model, loss_examples, batch_size, tokenizer.pad_token_id, device, bf16,
                                 max_tokens=max_tokens)
        result.update(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=tokens)
    if metric_records and metric != "none":
        predictions = generate(model, tokenizer, [r.messages for r in metric_records],
                               max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
        refs = references(metric_records)
        hits = (check or Check(metric)).hits(predictions, refs)
        result[metric] = sum(hits) / len(hits)
        result["metric_examples"] = len(refs)
        if keep_predictions:
            result["predictions"] = [
                {"prompt": r.messages[-2]["content"] if len(r.messages) > 1 else "", "reference": ref, "output": p,
                 "hit": h}
                for r, ref, p, h in list(zip(metric_records, refs, predictions, hits))[:keep_predictions]]
    return result


@torch.no_grad()
def predict(model, examples: list[Example], batch_size: int, pad_id: int, device, bf16: bool = False):
    """(predicted ids, true ids) for every example."""
    predicted, true = [], []
    with evaluation_mode(model):
        for idx in length_batches(examples, batch_size):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with autocast(device, bf16):
                logits = model(**classifier_inputs(batch)).logits
            predicted += logits.argmax(-1).tolist()
            true += class_targets(batch["labels"]).tolist()
    return predicted, true


@torch.no_grad()
def class_probabilities(model, examples: list[Example], batch_size: int, pad_id: int, device, bf16: bool = False,
                        progress=None) -> list[list[float]]:
    """Softmax class probabilities of every example, in the examples' order; `progress(n)` is told
    after each batch how many examples it held."""
    out: list[list[float]] = [[] for _ in examples]
    with evaluation_mode(model):
        for idx in length_batches(examples, batch_size):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with autocast(device, bf16):
                logits = model(**classifier_inputs(batch)).logits.float()
            for i, row in zip(idx, logits.softmax(-1).tolist()):
                out[i] = row
            if progress is not None:
                progress(len(idx))
    return out


def evaluate_classifier(model, *, loss_examples: list[Example], metric_examples: list[Example], labels: list[str],
                        batch_size: int, pad_id: int, device, bf16: bool = False) -> dict:
    result: dict = {}
    if loss_examples:
        result["loss"], _ = mean_loss(model, loss_examples, batch_size, pad_id, device, bf16, classification_loss)
    if metric_examples:
        predicted, true = predict(model, metric_examples, batch_size, pad_id, device, bf16)
        result.update(classification_metrics(predicted, true, labels))
    return result
