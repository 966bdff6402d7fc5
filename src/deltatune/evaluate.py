"""Evaluate a model on held-out data: loss, perplexity and a task metric from greedy generation.

Everything streams in batches: the loss is summed as it goes and generated text is kept,
logits never are, so memory stays bounded whatever the data size.
"""

from __future__ import annotations

import math

import torch

from deltatune.data import Example, prompt_ids
from deltatune.formats import Record
from deltatune.train import mean_loss


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    hits = sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], *, pad_id: int, stop_ids: set[int],
                         max_new_tokens: int = 64, batch_size: int = 8,
                         device: torch.device | None = None) -> list[list[int]]:
    """Greedy new token ids after each prompt, cut at the first stop id; left-padded length-sorted batches."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        # Left padding, so every row's next token is generated at the same position.
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=sorted(stop_ids) or None)
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            outputs[i] = new[: next((k for k, t in enumerate(new) if t in stop_ids), len(new))]
    model.train(was_training)
    return outputs


def stop_ids(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}


def generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 64,
             batch_size: int = 8, device: torch.device | None = None) -> list[str]:
    """Greedy answers to each conversation's prompt (its last assistant turn is left out)."""
    prompts = [prompt_ids(tokenizer, conv) for conv in conversations]
    new = greedy_continuations(model, prompts, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids(tokenizer),
                               max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]


def references(records: list[Record]) -> list[str]:
    return [r.messages[-1]["content"] for r in records]


def evaluate(model, tokenizer, *, loss_examples: list[Example] | None, metric_records: list[Record] | None,
             metric: str = "exact_match", batch_size: int = 8, max_new_tokens: int = 64,
             device: torch.device, bf16: bool = False, keep_predictions: int = 0) -> dict:
    """{loss, perplexity, tokens, <metric>, predictions[:keep_predictions]} for one model."""
    result: dict = {}
    if loss_examples:
        loss, tokens = mean_loss(model, loss_examples, batch_size, tokenizer.pad_token_id, device, bf16)
        result.update(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=tokens)
    if metric_records and metric != "none":
        predictions = generate(model, tokenizer, [r.messages for r in metric_records],
                               max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
        refs = references(metric_records)
        result[metric] = exact_match(predictions, refs)
        result["metric_examples"] = len(refs)
        if keep_predictions:
            result["predictions"] = [
                {"prompt": r.messages[-2]["content"] if len(r.messages) > 1 else "", "reference": ref, "output": p}
                for r, ref, p in list(zip(metric_records, refs, predictions))[:keep_predictions]]
    return result
