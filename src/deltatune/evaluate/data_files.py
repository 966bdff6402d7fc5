"""`deltatune eval` and `deltatune predict` on a data file: a tuned model scored, or a file labelled.

A causal LM is scored on conversations (loss, perplexity, the task metric on greedy answers);
a classifier on labelled text (loss, accuracy, macro-F1, per-class precision and recall, the
confusion matrix), tokenised exactly as training tokenised it (text pairs with their token
types). `predict` labels records that may have no label, and writes each input record back
with its `predicted` label and class `probabilities`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from deltatune.data.examples import build_sft_examples
from deltatune.data.formats import CHAT_FORMATS, Record, load_records, read_raw
from deltatune.data.text_examples import build_classification_examples
from deltatune.errors import UserError, where
from deltatune.evaluate.evaluate import class_probabilities, evaluate, evaluate_classifier
from deltatune.evaluate.metrics import Check
from deltatune.model.load import load_causal_lm, load_classifier
from deltatune.model.parts import accepts_token_types, without_adapters
from deltatune.progress import stage
from deltatune.runtime.precision import pick_device, resolve_bf16


@dataclass(frozen=True)
class FileSettings:
    """How `eval` and `predict` read and score a data file (their flags)."""

    fmt: str = "auto"
    check: Check = Check()
    max_seq_length: int = 1024
    max_new_tokens: int = 64
    batch_size: int = 8
    show: int = 5  # predictions kept in the result
    allow_pickle: bool = False
    trust_remote_code: bool = False


def _on_device(model):
    device = pick_device()
    return model.to(device).eval(), device


def evaluate_chats(model_name: str, data_file: str, settings: FileSettings) -> dict:
    """A causal LM on conversations: loss, perplexity and the task metric."""
    records, fmt = load_records(data_file, settings.fmt)
    if fmt not in CHAT_FORMATS:
        raise UserError(f"{data_file}: format '{fmt}' has no conversations to evaluate")
    model, tokenizer = load_causal_lm(model_name, allow_pickle=settings.allow_pickle,
                                      trust_remote_code=settings.trust_remote_code)
    model, device = _on_device(model)
    examples, _ = build_sft_examples(records, tokenizer, max_seq_length=settings.max_seq_length, name=data_file)
    return evaluate(model, tokenizer, loss_examples=examples, metric_records=records, metric=settings.check.metric,
                    check=settings.check, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                    device=device, bf16=resolve_bf16("auto", device), keep_predictions=settings.show)


def _classifier(model_name: str, settings: FileSettings):
    model, tokenizer = load_classifier(model_name, None, allow_pickle=settings.allow_pickle,
                                       trust_remote_code=settings.trust_remote_code)
    config = without_adapters(model).config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return model, tokenizer, labels, config.label2id


def evaluate_labelled(model_name: str, data_file: str, settings: FileSettings) -> dict:
    """A classifier on labelled text: loss, accuracy, macro-F1, per-class scores, confusion matrix."""
    records, fmt = load_records(data_file, settings.fmt)
    if fmt != "classification":
        raise UserError(f"{data_file}: format '{fmt}' has no labels to score a classifier on "
                        "(records need 'text' and 'label'; 'deltatune predict' labels unlabelled text)")
    model, tokenizer, labels, label2id = _classifier(model_name, settings)
    examples, _ = build_classification_examples(records, tokenizer, max_seq_length=settings.max_seq_length,
                                                label2id=label2id, name=data_file,
                                                token_types=accepts_token_types(model),
                                                labels_from=f"the labels of {model_name}")
    model, device = _on_device(model)
    bf16 = resolve_bf16("auto", device)
    pad = tokenizer.pad_token_id
    result = evaluate_classifier(model, loss_examples=examples, metric_examples=examples, labels=labels,
                                 batch_size=settings.batch_size, pad_id=pad, device=device, bf16=bf16)
    if settings.show:
        shown = examples[: settings.show]
        probabilities = class_probabilities(model, shown, settings.batch_size, pad, device, bf16)
        result["predictions"] = [{"text": r.text, **({"text_pair": r.text_pair} if r.text_pair else {}),
                                  "label": r.label, "predicted": labels[max(range(len(p)), key=p.__getitem__)]}
                                 for r, p in zip(records, probabilities)]
    return result


def unlabelled_records(path: str) -> tuple[list[dict], list[Record]]:
    """(the raw objects, their records): `text` required, `text_pair` optional, a label ignored."""
    raws, records = [], []
    for line, obj in read_raw(path):
        loc = where(path, line)
        text, pair = obj.get("text"), obj.get("text_pair")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{loc}: field 'text' must be a non-empty string (predict labels text records)")
        if pair is not None and not isinstance(pair, str):
            raise UserError(f"{loc}: field 'text_pair' must be a string, got {type(pair).__name__}")
        raws.append(obj)
        records.append(Record(text=text, text_pair=pair, source=loc))
    if not records:
        raise UserError(f"{path}: no records found (add at least one)")
    return raws, records


def predict_labels(model_name: str, data_file: str, out: Path, settings: FileSettings, overwrite: bool = False
                   ) -> int:
    """Write `out` (JSONL): each record of `data_file` with `predicted` and `probabilities` added;
    returns how many. Written under a temporary name and renamed: never half a file."""
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (choose another --out, or pass --overwrite)")
    raws, records = unlabelled_records(data_file)
    model, tokenizer, labels, _ = _classifier(model_name, settings)
    examples, _ = build_classification_examples(records, tokenizer, max_seq_length=settings.max_seq_length,
                                                label2id=None, name=data_file, token_types=accepts_token_types(model))
    model, device = _on_device(model)
    with stage("predict", total=len(examples)) as advance:
        probabilities = class_probabilities(model, examples, settings.batch_size, tokenizer.pad_token_id, device,
                                             resolve_bf16("auto", device), progress=advance)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for raw, p in zip(raws, probabilities):
                best = max(range(len(p)), key=p.__getitem__)
                f.write(json.dumps({**raw, "predicted": labels[best],
                                    "probabilities": dict(zip(labels, p))}, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(raws)
