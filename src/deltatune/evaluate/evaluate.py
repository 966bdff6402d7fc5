"""Evaluate a model on held-out data: loss, perplexity and a task metric from greedy generation.

Everything streams in batches: the loss is summed as it goes and generated text is kept,
logits never are, so memory stays bounded whatever the data size.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.data import Example, prompt_ids
from deltatune.errors import UserError
from deltatune.formats import Record
from deltatune.train import mean_loss


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


@dataclass(frozen=True)
class Check:
    """How one generated output is scored: against its reference, a regex, or a JSON Schema."""

    metric: str = "exact_match"
    pattern: str | None = None
    schema: dict | None = None

    def hit(self, output: str, reference: str) -> bool:
        if self.metric == "exact_match":
            return normalise_answer(output) == normalise_answer(reference)
        if self.metric == "contains":
            return normalise_answer(reference) in normalise_answer(output)
        if self.metric == "regex":
            return re.fullmatch(self.pattern, output.strip(), flags=re.DOTALL) is not None
        if self.metric == "json_schema":
            import jsonschema

            try:
                jsonschema.validate(json.loads(output), self.schema)
            except (json.JSONDecodeError, jsonschema.ValidationError):
                return False
            return True
        raise ValueError(f"unknown metric {self.metric!r}")

    def hits(self, outputs: list[str], references: list[str]) -> list[float]:
        return [float(self.hit(o, r)) for o, r in zip(outputs, references)]


def load_check(metric: str, pattern: str | None = None, schema_file: str | None = None) -> Check:
    """Validate a metric's settings up front: a broken regex or schema fails before any training."""
    if metric == "regex":
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(f"metric_pattern: not a valid regular expression ({err})") from None
    schema = None
    if metric == "json_schema":
        import jsonschema

        path = Path(schema_file)
        if not path.is_file():
            raise UserError(f"metric_schema: {path}: file not found (give the path of a JSON Schema file)")
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON in the schema ({err.msg})") from None
        except jsonschema.SchemaError as err:
            raise UserError(f"{path}: not a valid JSON Schema ({err.message})") from None
    return Check(metric, pattern, schema)


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    return sum(Check().hits(predictions, references)) / len(references)


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
