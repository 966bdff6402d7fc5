"""Scoring outputs: a generated answer against its reference (or a regex, or a JSON Schema),
and a classifier's predictions against the true labels."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import UserError


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
