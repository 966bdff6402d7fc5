"""The delta report for a sequence classifier: what training added, and what it moved in the backbone.

A classifier has no LM head, so the causal report's forgetting measures (perplexity, KL,
fact probes) do not apply. In their place this measures how far the backbone's
representation of general text drifted. The parts:

- task gain: accuracy and macro-F1 on the held-out split, validation loss, each with a paired
  bootstrap 95 % CI of the gain (`measures.paired_gain`, `measures.paired_statistic_gain`);
- representation drift: sentences from the same seeded general-text sample the causal report
  uses (`measures.general_texts`, more passages, split into sentences), embedded by the base and
  the tuned backbone (mean of the last hidden state over real tokens); per-sentence cosine
  similarity and linear CKA (Kornblith et al. 2019) between the two embedding sets, streamed
  batch by batch so memory does not grow with the number of sentences;
- weight delta of the backbone (`weights.weight_delta`); the new head has no pre-trained
  counterpart, so it is listed apart ("new") with its change from its initialisation;
- side by side: true label, base and tuned prediction for held-out texts.

"Base" is the pre-trained backbone with the freshly initialised head exactly as training
started (reloaded with the run's seed), so every gain is what training added.

The delta.json it writes is documented in delta/render.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deltatune import config
from deltatune.data.batching import collate, length_batches
from deltatune.data.examples import IGNORE_INDEX, Example
from deltatune.data.formats import Record
from deltatune.data.text_examples import build_classification_examples
from deltatune.delta import measures as delta
from deltatune.delta.measures import CompareSettings, ReportOptions, timed
from deltatune.delta.render import (
    SCHEMA,
    SCHEMA_VERSION,
    ReportKind,
    display_name,
    fmt,
    md_table,
    pct,
    publish,
    training_markdown,
    training_section,
    weight_markdown,
)
from deltatune.delta.weights import canonical_name, weight_delta
from deltatune.errors import UserError
from deltatune.evaluate.loss import class_targets, classifier_inputs
from deltatune.model.load import load_classifier
from deltatune.model.parts import accepts_token_types, head_module_names, without_adapters
from deltatune.runtime.precision import autocast, pick_device

REPRESENTATION_PASSAGES = 128  # general-text passages; the causal report's 16 come first
SENTENCE_TOKENS = 64
MIN_SENTENCE_WORDS = 5
MAX_SENTENCES = 512
POOLING = "mean of the backbone's last hidden state over real tokens"
BASE_DEFINITION = ("the pre-trained backbone with the freshly initialised classification head exactly as "
                   "training started (same seed): the gain is what training added")


# --- the model's parts ---------------------------------------------------------------------------

def backbone(model):
    return without_adapters(model).base_model  # transformers: the module under `base_model_prefix` (bert, model, ...)


def head_prefixes(model) -> tuple[str, ...]:
    return tuple(f"{name}." for name in head_module_names(without_adapters(model)))


def label_list(model) -> list[str]:
    config = without_adapters(model).config
    return [config.id2label[i] for i in range(config.num_labels)]


# --- per-example outputs -------------------------------------------------------------------------

@torch.no_grad()
def classifier_outputs(model, examples: list[Example], batch_size: int, pad_id: int, device, bf16: bool = False):
    """(predicted ids, per-example cross-entropy, true ids), in the examples' order, one batch at a time.

    `bf16`: autocast as the run's own evaluation did, so the base scores exactly what it scored there.
    """
    n = len(examples)
    predicted, losses, true = np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n, dtype=np.int64)
    model.eval()
    for idx in length_batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with autocast(device, bf16):
            logits = model(**classifier_inputs(batch)).logits.float()
        targets = class_targets(batch["labels"])
        predicted[idx] = logits.argmax(-1).cpu().numpy()
        losses[idx] = F.cross_entropy(logits, targets, reduction="none").double().cpu().numpy()
        true[idx] = targets.cpu().numpy()
    return predicted, losses, true


def macro_f1_statistic(true: np.ndarray, num_labels: int):
    """statistic(predicted, idx) for `delta.paired_statistic_gain`: macro-F1 of each resample row.

    The same definition as `classify.classification_metrics` (mean over all labels, F1 = 0 for a
    label never predicted and never true), counted with one bincount per quantity.
    """
    true = np.asarray(true)
    k = num_labels

    def statistic(predicted: np.ndarray, idx: np.ndarray) -> np.ndarray:
        p, t = predicted[idx], true[idx]
        offset = np.arange(idx.shape[0])[:, None] * k

        def count(codes, weights=None):
            return np.bincount((offset + codes).ravel(), weights=None if weights is None else weights.ravel(),
                               minlength=idx.shape[0] * k).reshape(-1, k).astype(np.float64)
        tp, n_pred, support = count(t, (p == t).astype(np.float64)), count(p), count(t)
        precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
        return f1.mean(axis=1)
    return statistic


# --- representation drift ------------------------------------------------------------------------

def general_sentences(path: str | None = None, *, seed: int = 0) -> tuple[list[str], str, int]:
    """(sentences, source, passages): the causal report's seeded general-text sample, extended with
    more passages from the same source (a second seeded draw) and split into sentences: CKA needs
    more points than 16 passages give."""
    passages, source = delta.general_texts(path, seed=seed)
    more, _ = delta.general_texts(path, n=REPRESENTATION_PASSAGES, seed=seed + 1)
    passages += [p for p in more if p not in passages][: REPRESENTATION_PASSAGES - len(passages)]
    sentences = [s for p in passages for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", p)
                 if len(s.split()) >= MIN_SENTENCE_WORDS]
    return (sentences or passages)[:MAX_SENTENCES], source, len(passages)


def sentence_examples(tokenizer, sentences: list[str], max_tokens: int = SENTENCE_TOKENS) -> list[Example]:
    out = []
    for s in sentences:
        ids = tokenizer(s, truncation=True, max_length=max_tokens)["input_ids"]
        if ids:
            out.append(Example(ids, [IGNORE_INDEX] * len(ids)))
    return out


class CkaSums:
    """Running sums for linear CKA between paired rows of X and Y, without keeping the rows.

    CKA(X, Y) = ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F) with Xc, Yc centred over the rows; the
    centred products follow from Σxxᵀ, Σx and n, so memory is three d×d float64 matrices.
    """

    def __init__(self, dim_x: int, dim_y: int):
        self.n = 0
        self.sx, self.sy = torch.zeros(dim_x, dtype=torch.float64), torch.zeros(dim_y, dtype=torch.float64)
        self.xx = torch.zeros(dim_x, dim_x, dtype=torch.float64)
        self.yy = torch.zeros(dim_y, dim_y, dtype=torch.float64)
        self.yx = torch.zeros(dim_y, dim_x, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double().cpu(), y.double().cpu()
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.yx += y.T @ x

    def value(self) -> float:
        if self.n < 2:
            return float("nan")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx - self.n * torch.outer(mx, mx)
        cyy = self.yy - self.n * torch.outer(my, my)
        cyx = self.yx - self.n * torch.outer(my, mx)
        denom = torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)
        return float((torch.linalg.matrix_norm(cyx) ** 2 / denom).clamp(max=1.0)) if denom > 0 else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [n, d] representations of the same n inputs (1 = same up to rotation and scale)."""
    sums = CkaSums(x.shape[1], y.shape[1])
    sums.add(x, y)
    return sums.value()


def _mean_pool(model, batch: dict) -> torch.Tensor:
    hidden = backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def representation_drift(base, tuned, examples: list[Example], pad_id: int, device, batch_size: int = 16) -> dict:
    """Mean/min cosine between base and tuned sentence embeddings, and their linear CKA (streamed)."""
    for model in (base, tuned):
        model.eval()
    sums, cosines, tokens = None, [], 0
    for idx in length_batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        x, y = _mean_pool(base, batch).float(), _mean_pool(tuned, batch).float()
        sums = sums or CkaSums(x.shape[1], y.shape[1])
        sums.add(x, y)
        cosines += F.cosine_similarity(x.double(), y.double(), dim=-1).clamp(-1.0, 1.0).tolist()
        tokens += int(batch["attention_mask"].sum())
    cka = sums.value() if sums else float("nan")
    nan = float("nan")
    return {"sentences": len(cosines), "tokens": tokens, "mean_cosine": float(np.mean(cosines)) if cosines else nan,
            "min_cosine": float(np.min(cosines)) if cosines else nan, "cka": cka, "drift": 1.0 - cka}


# --- the new head ----------------------------------------------------------------------------------

def _head_name(name: str) -> str | None:
    """Canonical head parameter name; None for peft's frozen copy of the original head."""
    name = canonical_name(name)
    if ".original_module." in name:
        return None
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


@torch.no_grad()
def new_parameters(base, tuned, prefixes: tuple[str, ...]) -> list[dict]:
    """The head's parameters: norm, and change from the initialisation the base model holds."""
    init = {canonical_name(n): p for n, p in base.named_parameters()}
    rows = []
    for name, p in tuned.named_parameters():
        cname = _head_name(name)
        if cname is None or not cname.startswith(prefixes):
            continue
        w = p.detach().float().cpu()
        w0 = init[cname].detach().float().cpu() if cname in init and init[cname].shape == p.shape else None
        init_norm = float(w0.norm()) if w0 is not None else float("nan")
        delta_norm = float((w - w0).norm()) if w0 is not None else float("nan")
        rows.append({"name": cname, "shape": list(w.shape), "norm": float(w.norm()), "init_norm": init_norm,
                     "delta_norm": delta_norm,  # a bias starts at 0: only the absolute change means something
                     "change_from_init": delta_norm / init_norm if init_norm > 0 else float("nan")})
    return rows


# --- the report ------------------------------------------------------------------------------------

def measure(base, tuned, tokenizer, *, val_examples: list[Example], metric_examples: list[Example],
            metric_texts: list[str], evaluated_on: str, options, device, bf16: bool = False,
            loss_on: str = "validation data") -> dict:
    """Every base-vs-tuned number of a classification report (training excepted)."""
    seconds = {}
    pad = tokenizer.pad_token_id
    labels = label_list(tuned)
    if label_list(base) != labels:
        raise UserError(f"the base and tuned classifiers have different labels ({label_list(base)} vs {labels})")
    task: dict = {"evaluated_on": evaluated_on, "labels": labels, "accuracy": None, "macro_f1": None,
                  "metric": None, "validation": None, "base_matches_training_start": None}
    report: dict = {"task_type": "classification", "base_definition": BASE_DEFINITION, "task": task}

    with timed(seconds, "task"):
        side = []
        runs: dict = {}

        def outputs(model, examples):  # one pass per model and example list (often metric = validation)
            key = (id(model), id(examples))
            if key not in runs:
                runs[key] = classifier_outputs(model, examples, options.batch_size, pad, device, bf16)
            return runs[key]

        if metric_examples:
            pred_b, _, true = outputs(base, metric_examples)
            pred_t, _, _ = outputs(tuned, metric_examples)
            hits_b, hits_t = (pred_b == true).astype(float), (pred_t == true).astype(float)
            task["accuracy"] = {"name": "accuracy", **delta.paired_gain(hits_b, hits_t, seed=options.seed)}
            task["macro_f1"] = {"name": "macro_f1", **delta.paired_statistic_gain(
                macro_f1_statistic(true, len(labels)), pred_b, pred_t, seed=options.seed)}
            task["metric"] = task["accuracy"]
            side = [{"text": text, "label": labels[y], "base": labels[b], "tuned": labels[p]}
                    for text, y, b, p in zip(metric_texts, true, pred_b, pred_t)][: options.side_by_side]
        if val_examples:
            _, loss_b, _ = outputs(base, val_examples)
            _, loss_t, _ = outputs(tuned, val_examples)
            loss = delta.paired_gain(loss_b, loss_t, higher_is_better=False, seed=options.seed)
            task["validation"] = {"loss": loss, "examples": len(val_examples), "evaluated_on": loss_on}

    with timed(seconds, "representation"):
        sentences, source, passages = general_sentences(options.general_text_file, seed=options.seed)
        examples = sentence_examples(tokenizer, sentences)
        drift = representation_drift(base, tuned, examples, pad, device, options.batch_size)
        report["forgetting"] = {"representation": {"source": source, "passages": passages, "pooling": POOLING, **drift}}

    with timed(seconds, "weights"):
        prefixes = head_prefixes(base)
        report["weights"] = weight_delta(base, tuned, exclude=prefixes)
        report["weights"]["new"] = new_parameters(base, tuned, prefixes)
    report["side_by_side"] = side
    report["seconds"] = seconds
    return report


def build(base, tuned, tokenizer, *, base_model: str, tuned_model: str, metrics_path=None, fit=None, **kw) -> dict:
    report = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "base_model": display_name(base_model), "tuned_model": display_name(tuned_model)}
    report.update(measure(base, tuned, tokenizer, **kw))
    report["training"] = training_section(metrics_path, fit)
    return report


def _gain_row(label: str, m: dict) -> tuple[str, str, str, str]:
    sig = "significant" if m["significant"] else "not significant"
    return (label, pct(m["base"]), pct(m["tuned"]),
            f"{100 * m['gain']:+.1f} pt [{100 * m['gain_ci'][0]:+.1f}, {100 * m['gain_ci'][1]:+.1f}] {sig}")


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(measure, base, tuned, change): the compact table the CLI prints and report.md opens with."""
    rows = []
    task = report["task"]
    if task.get("accuracy"):
        n = task["accuracy"]["examples"]
        rows.append(_gain_row(f"accuracy ({task['evaluated_on']}, n={n})", task["accuracy"]))
        rows.append(_gain_row(f"macro-F1 ({task['evaluated_on']}, n={n})", task["macro_f1"]))
    if task.get("validation"):
        v = task["validation"]["loss"]
        sig = "significant" if v["significant"] else "not significant"
        where = task["validation"].get("evaluated_on", "validation data")
        rows.append((f"loss ({where}, n={task['validation']['examples']})", fmt(v["base"]), fmt(v["tuned"]),
                     f"{-v['gain']:+.4f} [{-v['gain_ci'][1]:+.4f}, {-v['gain_ci'][0]:+.4f}] {sig}"))
    r = report["forgetting"]["representation"]
    rows.append((f"backbone on general text: mean cosine (n={r['sentences']})", "1", fmt(r["mean_cosine"]),
                 f"min {fmt(r['min_cosine'])}"))
    rows.append(("backbone on general text: linear CKA", "1", fmt(r["cka"]), f"drift 1 − CKA = {fmt(r['drift'])}"))
    w = report["weights"]
    top = w["top"][0] if w["top"] else "-"
    rows.append(("backbone weights ‖ΔW‖/‖W‖", "", "", f"{fmt(w['relative_norm'])}; most changed: {top}"))
    if w.get("new"):
        changes = [m["change_from_init"] for m in w["new"] if m["change_from_init"] is not None]
        tensors = f"{len(w['new'])} tensor{'s' if len(w['new']) > 1 else ''}"
        rows.append((f"new head ({tensors}) ‖W − W_init‖/‖W_init‖", "", "",
                     fmt(max(changes)) if changes else "-"))
    return rows


def markdown(report: dict) -> str:
    task = report["task"]
    lines = ["# Delta report: what fine-tuning changed (classification)", "",
             f"Base `{report['base_model']}` → tuned `{report['tuned_model']}` (deltatune delta schema "
             f"v{report['schema_version']}, {report['created']})", "",
             f"Base = {report['base_definition']}.", "", "## Summary", ""]
    lines += md_table(["measure", "base", "tuned", "change"], [list(r) for r in summary_rows(report)])
    lines += ["", "Intervals are 95 % paired bootstrap CIs over examples; *significant* means the interval of "
              "the change excludes 0. Accuracy and macro-F1 are scored on the " + task["evaluated_on"] +
              f" (labels: {', '.join(task['labels'])}).", ""]
    if task.get("base_matches_training_start") is False:
        lines += ["**Warning:** the reloaded base did not score what the run's base evaluation scored "
                  "(the head initialisation was not reproduced).", ""]
    r = report["forgetting"]["representation"]
    lines += ["## Forgetting: representation drift of the backbone", "",
              f"- {r['sentences']} sentences ({r['tokens']} tokens) from {r['passages']} passages of {r['source']}, "
              f"embedded by base and tuned backbone ({r['pooling']}).",
              f"- Mean cosine similarity of each sentence's two embeddings: {fmt(r['mean_cosine'])} "
              f"(lowest {fmt(r['min_cosine'])}); identical backbones give 1.",
              f"- Linear CKA between the two embedding sets: {fmt(r['cka'])} (1 = the same geometry up to rotation "
              f"and scale); drift 1 − CKA = {fmt(r['drift'])}.", ""]
    lines += weight_markdown(report["weights"])
    new = report["weights"].get("new") or []
    if new:
        lines += ["", "New head (no pre-trained counterpart; change measured from its initialisation):", ""]
        lines += md_table(["parameter", "shape", "‖W‖", "‖W − W_init‖", "‖W − W_init‖/‖W_init‖"],
                           [[m["name"], "×".join(map(str, m["shape"])), fmt(m["norm"]), fmt(m["delta_norm"]),
                             fmt(m["change_from_init"])] for m in new])
    if report["side_by_side"]:
        lines += ["", "## Side by side (held-out texts)", ""]
        lines += md_table(["text", "true", "base", "tuned"],
                           [[x["text"], x["label"], x["base"], x["tuned"]] for x in report["side_by_side"]])
    lines += training_markdown(report.get("training"))
    lines += ["", "Measurement time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def record_texts(records: list[Record]) -> list[str]:
    """How a side-by-side row shows a record: its text, or `text | text_pair`."""
    return [r.text if not r.text_pair else f"{r.text} | {r.text_pair}" for r in records]


def after_training(model_args, options: ReportOptions, bf16: bool, tuned, tokenizer, *, val_examples,
                   metric_examples, metric_records: list[Record], evaluated_on: str, before: dict, fit,
                   out_dir: Path, device) -> dict:
    """The end of a classification `deltatune train`: compare with the base as training started.

    `model_args`: the run's ModelArgs; `options.seed` re-creates the head the run started from;
    `bf16`: the run's autocast decision, so the base scores what the run's own evaluation scored."""
    print("measuring what fine-tuning changed (delta report)...", flush=True)
    start = time.perf_counter()
    base, _ = load_classifier(model_args.name, label_list(tuned), seed=options.seed,
                              allow_pickle=model_args.allow_pickle, trust_remote_code=model_args.trust_remote_code)
    base.to(device).eval()
    report = build(base, tuned, tokenizer, base_model=model_args.name, tuned_model=str(out_dir / "final"),
                   metrics_path=out_dir / "metrics.jsonl", fit=fit, val_examples=val_examples,
                   metric_examples=metric_examples, metric_texts=record_texts(metric_records),
                   evaluated_on=evaluated_on, options=options, device=device, bf16=bf16)
    if report["task"]["accuracy"] and "accuracy" in before:
        same = abs(report["task"]["accuracy"]["base"] - before["accuracy"]) < 1e-9
        report["task"]["base_matches_training_start"] = same
        if not same:
            print(f"warning: the reloaded base scores accuracy {report['task']['accuracy']['base']:.4f}, the run's "
                  f"base evaluation {before['accuracy']:.4f}", flush=True)
    report["seconds"]["total"] = time.perf_counter() - start
    del base
    publish(out_dir, report, markdown, summary_rows(report), took=f" ({report['seconds']['total']:.0f} s)")
    return report


def run_seed(tuned_name: str) -> int | None:
    """The seed a deltatune run used (its config.yaml next to final/), or None."""
    import yaml

    path = Path(tuned_name).parent / "config.yaml"
    try:
        seed = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("seed")
    except (OSError, yaml.YAMLError, AttributeError):
        seed = None
    return seed if isinstance(seed, int) else None


def compare(base_name: str, tuned_name: str, records: list[Record], data_file: str, out_dir: Path,
            settings: CompareSettings, base_has_head: bool) -> dict:
    """`deltatune compare` on classification data: two classifiers, or a base encoder and a tuned
    classifier (`base_has_head` False: the base then gets a fresh head, seeded as the run that made
    the tuned one). With a run's config.yaml next to the tuned folder, its seed also fixes the
    bootstrap and the general-text sample, so the numbers are the training report's."""
    records = records[:settings.max_examples] if settings.max_examples else records
    options, seed = settings.options, run_seed(tuned_name)
    if seed is not None:
        options = dataclasses.replace(options, seed=seed)
    opts = dict(allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code)
    tuned, tokenizer = load_classifier(tuned_name, None, **opts)
    if base_has_head:
        base, _ = load_classifier(base_name, None, **opts)
    else:  # without a run's config.yaml: the default seed, as a run that never set one
        head_seed = config.default("seed") if seed is None else seed
        base, _ = load_classifier(base_name, label_list(tuned), seed=head_seed, **opts)
    device = pick_device()
    base.to(device).eval()
    tuned.to(device).eval()
    examples, _ = build_classification_examples(records, tokenizer, max_seq_length=settings.max_seq_length,
                                                label2id=without_adapters(tuned).config.label2id, name=str(data_file),
                                                token_types=accepts_token_types(tuned),
                                                labels_from=f"the labels of {tuned_name}")
    start = time.perf_counter()
    metrics_path = Path(tuned_name).parent / "metrics.jsonl"
    report = build(base, tuned, tokenizer, base_model=base_name, tuned_model=tuned_name,
                   metrics_path=metrics_path if metrics_path.is_file() else None, val_examples=examples,
                   metric_examples=examples, metric_texts=record_texts(records), evaluated_on=Path(data_file).name,
                   loss_on=Path(data_file).name, options=options, device=device)
    report["seconds"]["total"] = time.perf_counter() - start
    publish(out_dir, report, markdown, summary_rows(report))
    return report


def frontier_point(name: str, settings: dict, report: dict) -> dict:
    """A classifier's point: accuracy gain (else the fall of validation loss) against 1 − backbone CKA."""
    gain = delta.gain_point(report["task"].get("accuracy"), "accuracy gain", report["task"].get("validation"))
    r = report["forgetting"]["representation"]
    return {"name": name, "settings": settings, **gain, "forgetting": r["drift"], "cka": r["cka"],
            "mean_cosine": r["mean_cosine"], "macro_f1_gain": (report["task"].get("macro_f1") or {}).get("gain"),
            "perplexity_change": None, "fact_retention": None,
            "weight_change": report["weights"]["relative_norm"], "task_type": "classification"}


def frontier_measures(e: dict) -> list[str]:
    return [fmt(e.get("cka")), fmt(e.get("mean_cosine"))]


KIND = ReportKind("classification", compare, frontier_point,
                  ("run", "accuracy gain [95% CI]", "1 − CKA", "CKA", "mean cosine", "‖ΔW‖/‖W‖ backbone",
                   "within budget", ""),
                  frontier_measures, "1 − linear CKA of the backbone's sentence embeddings on general text")
