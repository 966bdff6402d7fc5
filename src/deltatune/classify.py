"""Sequence classification: `{text, label}` records → a model with a new head sized to the label set.

The base model is loaded with `AutoModelForSequenceClassification`, so an encoder (BERT's
pooled [CLS]) and a decoder (its last non-pad token) both work; label names ↔ ids live in the
model config (`id2label`/`label2id`) and are saved with it. Examples reuse `data.Example`: the
class id sits at the *last* token's label position (everything else IGNORE_INDEX), so the
training loop's count of label positions per step counts examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from deltatune.data import IGNORE_INDEX, DatasetStats, Example, collate, length_batches
from deltatune.errors import UserError
from deltatune.formats import Record
from deltatune.train import autocast

LABELS_FILE = "labels.json"  # written next to a classification adapter, which has no config.json


def label_names(records: list[Record]) -> list[str]:
    """The label set of the training data, in a stable order (numerically when every label is an integer)."""
    names = {r.label for r in records}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def build_classification_examples(records: list[Record], tokenizer, *, max_seq_length: int,
                                  label2id: dict[str, int], name: str = "data") -> tuple[list[Example], DatasetStats]:
    limit = min(max_seq_length, getattr(tokenizer, "model_max_length", max_seq_length) or max_seq_length)
    stats = DatasetStats()
    examples = []
    for record in records:
        if record.label is None:
            raise UserError(f"{record.source}: record has no 'label'; task 'classification' needs "
                            "{\"text\": ..., \"label\": ...} records")
        if record.label not in label2id:
            raise UserError(f"{record.source}: label '{record.label}' does not occur in the training data "
                            f"(known labels: {', '.join(label2id)})")
        ids = tokenizer(record.text, record.text_pair)["input_ids"]
        if len(ids) > limit:
            stats.truncated += 1
            ids = tokenizer(record.text, record.text_pair, truncation=True, max_length=limit)["input_ids"]
        if len(ids) < 2:
            # Position 0 is never a label position in the shared batching code; pad with eos/sep.
            ids = ids + [tokenizer.sep_token_id or tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * (len(ids) - 1) + [label2id[record.label]]
        examples.append(Example(ids, labels, record.source))
        stats.tokens += len(ids)
    stats.examples = stats.label_tokens = len(examples)
    if not examples:
        raise UserError(f"{name}: no records")
    return examples, stats


def class_targets(labels: torch.Tensor) -> torch.Tensor:
    """The one class id per row (every other position is IGNORE_INDEX, which is smaller)."""
    return labels.max(dim=1).values


def classification_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the batch, number of examples)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = class_targets(batch["labels"])
    return F.cross_entropy(logits, targets, reduction="sum"), torch.tensor(len(targets), device=logits.device)


# --- loading and saving --------------------------------------------------------------------------

def load_classifier(name: str, labels: list[str] | None, *, seed: int = 0, allow_pickle: bool = False,
                    trust_remote_code: bool = False, quantization_config=None):
    """(model, tokenizer). With `labels`, the head is a new linear layer sized to them; without, the
    folder's own labels are used (a tuned classifier or a classification adapter)."""
    from transformers import AutoModelForSequenceClassification

    from deltatune.methods import is_adapter_dir, load_adapter_model
    from deltatune.model import _load_error, check_weights_safe, load_tokenizer, resolve

    folder = resolve(name)
    if is_adapter_dir(folder):
        saved = _read_labels(folder)
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code, generates=False)
        model = load_adapter_model(folder, lambda base: load_classifier(
            base, saved, seed=seed, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)[0])
        return model, tokenizer
    check_weights_safe(folder, allow_pickle)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code, generates=False)
    kwargs = {}
    if labels is not None:
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)
    torch.manual_seed(seed)  # the new head's initialisation
    try:
        # Decoders pool the last token that is not padding, so the config must know the pad id.
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, quantization_config=quantization_config, **kwargs)
    except Exception as err:
        raise _load_error(name, err) from None
    return model, tokenizer


def _read_labels(folder: Path) -> list[str]:
    path = folder / LABELS_FILE
    if not path.is_file():
        raise UserError(f"{folder}: classification adapter without {LABELS_FILE} (the label names are unknown)")
    id2label = json.loads(path.read_text(encoding="utf-8"))["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]


def save_labels_if_adapter(model, folder: Path) -> None:
    """An adapter folder has no config.json: keep the label names next to it."""
    from deltatune.methods import is_adapter_dir

    if is_adapter_dir(folder):
        config = model.get_base_model().config
        (folder / LABELS_FILE).write_text(json.dumps({"id2label": {str(k): v for k, v in config.id2label.items()},
                                                      "label2id": config.label2id}, indent=2) + "\n")


# --- metrics -------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, examples: list[Example], batch_size: int, pad_id: int, device, bf16: bool = False):
    """(predicted ids, true ids) for every example."""
    was_training = model.training
    model.eval()
    predicted, true = [], []
    for idx in length_batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with autocast(device, bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted += logits.argmax(-1).tolist()
        true += class_targets(batch["labels"]).tolist()
    model.train(was_training)
    return predicted, true


def classification_metrics(predicted: list[int], true: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix (rows: true, cols: predicted)."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for p, t in zip(predicted, true):
        confusion[t][p] += 1
    per_class, f1s = {}, []
    for c, name in enumerate(labels):
        tp = confusion[c][c]
        predicted_c = sum(confusion[r][c] for r in range(k))
        support = sum(confusion[c])
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        f1s.append(f1)
    n = len(true)
    return {"accuracy": sum(p == t for p, t in zip(predicted, true)) / n if n else float("nan"),
            "macro_f1": sum(f1s) / k if k else float("nan"), "per_class": per_class,
            "confusion_matrix": confusion, "labels": labels, "metric_examples": n}


def evaluate_classifier(model, *, loss_examples: list[Example], metric_examples: list[Example], labels: list[str],
                        batch_size: int, pad_id: int, device, bf16: bool = False) -> dict:
    from deltatune.train import mean_loss

    result: dict = {}
    if loss_examples:
        result["loss"], _ = mean_loss(model, loss_examples, batch_size, pad_id, device, bf16, classification_loss)
    if metric_examples:
        predicted, true = predict(model, metric_examples, batch_size, pad_id, device, bf16)
        result.update(classification_metrics(predicted, true, labels))
    return result


def summary_lines(before: dict, after: dict) -> list[str]:
    """Markdown: per-class precision/recall and the confusion matrix, base → tuned."""
    if "per_class" not in after:
        return []
    lines = ["", "## Classification", "", "| class | precision (base → tuned) | recall (base → tuned) | support |",
             "|---|---|---|---|"]
    for name, a in after["per_class"].items():
        b = before.get("per_class", {}).get(name, {})
        lines.append(f"| {name} | {b.get('precision', 0):.3f} → {a['precision']:.3f} | "
                     f"{b.get('recall', 0):.3f} → {a['recall']:.3f} | {a['support']} |")
    labels = after["labels"]
    lines += ["", "Confusion matrix after tuning (rows: true, columns: predicted):", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
              for name, row in zip(labels, after["confusion_matrix"])]
    return lines
