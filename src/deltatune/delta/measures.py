"""Measure what fine-tuning changed: base vs tuned on the same inputs.

Four kinds of numbers, each a plain function:

- task gain: per-example losses and metric hits, with (paired) bootstrap confidence intervals;
- forgetting: perplexity and per-token KL(base ‖ tuned) on general text, KL on continuations
  sampled from the base model itself, and fact-recall retention (`probes.py`);
- weight delta: per matrix ‖ΔW‖_F/‖W_base‖_F, effective rank of ΔW, intruder dimensions (weights.py);
- side-by-side generations (taken from the pipeline's predictions).

Memory stays bounded: the decoder runs one batch at a time and the vocabulary projection
runs on `HEAD_CHUNK_ELEMENTS` logits at a time, so no full [batch, length, vocab] logits tensor
of a whole dataset (or even of a whole batch) is ever held.
"""

from __future__ import annotations

import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deltatune.data.batching import collate, length_batches
from deltatune.data.examples import IGNORE_INDEX, Example
from deltatune.errors import UserError
from deltatune.evaluate import probes
from deltatune.evaluate.metrics import Check
from deltatune.progress import stage

HEAD_CHUNK_ELEMENTS = 1 << 23  # logits at once (a few positions of a 128k vocabulary, more of a small one)
GENERAL_CHUNKS = 16       # general-text passages in the fixed sample
GENERAL_TOKENS = 128      # tokens per passage
SAMPLE_TOKENS = 32        # tokens per continuation sampled from the base model


# --- statistics ------------------------------------------------------------------------------

def bootstrap_ci(values, weights=None, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """(point, low, high): percentile bootstrap CI of a (weighted) mean, resampling examples.

    With weights the statistic is Σv/Σw (e.g. summed token losses over token counts).
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    point = v.sum() / w.sum()
    idx = resample_indices(len(v), n_boot=n_boot, seed=seed)
    stats = v[idx].sum(1) / np.maximum(w[idx].sum(1), 1e-12)
    return (float(point), *_percentiles(stats, level))


def resample_indices(n: int, *, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """[n_boot, n] example indices drawn with replacement: the resamples every bootstrap here uses."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def paired_gain(base, tuned, weights=None, *, higher_is_better: bool = True, seed: int = 0) -> dict:
    """Gain of tuned over base on the same examples, with a paired bootstrap CI.

    Resampling the examples jointly removes the between-example variance both models share,
    so a real improvement is detected with far fewer examples than two separate CIs need.
    """
    sign = 1.0 if higher_is_better else -1.0
    diff = sign * (np.asarray(tuned, dtype=np.float64) - np.asarray(base, dtype=np.float64))
    b = bootstrap_ci(base, weights, seed=seed)
    t = bootstrap_ci(tuned, weights, seed=seed)
    g = bootstrap_ci(diff, weights, seed=seed)
    return {"base": b[0], "base_ci": [b[1], b[2]], "tuned": t[0], "tuned_ci": [t[1], t[2]],
            "gain": g[0], "gain_ci": [g[1], g[2]], "significant": bool(g[1] > 0 or g[2] < 0),
            "examples": int(len(diff))}


def paired_statistic_gain(statistic, base, tuned, *, higher_is_better: bool = True, seed: int = 0,
                          level: float = 0.95) -> dict:
    """`paired_gain` for a statistic that is not a mean of per-example values (e.g. macro-F1).

    `statistic(values, idx)` scores the examples `values[idx]` of each row of `idx` (an
    [n_boot, n] index array) and returns one number per row. Base and tuned are scored on the
    same resamples (the same ones `bootstrap_ci` draws for this seed), so the CI is paired.
    """
    base, tuned = np.asarray(base), np.asarray(tuned)
    n = len(base)
    if n == 0:
        nan = float("nan")
        return {"base": nan, "base_ci": [nan, nan], "tuned": nan, "tuned_ci": [nan, nan], "gain": nan,
                "gain_ci": [nan, nan], "significant": False, "examples": 0}
    sign = 1.0 if higher_is_better else -1.0
    whole = np.arange(n)[None, :]
    idx = resample_indices(n, seed=seed)
    b_point, t_point = float(statistic(base, whole)[0]), float(statistic(tuned, whole)[0])
    b, t = statistic(base, idx), statistic(tuned, idx)
    lo, hi = _percentiles(sign * (t - b), level)
    return {"base": b_point, "base_ci": list(_percentiles(b, level)), "tuned": t_point,
            "tuned_ci": list(_percentiles(t, level)), "gain": sign * (t_point - b_point), "gain_ci": [lo, hi],
            "significant": bool(lo > 0 or hi < 0), "examples": int(n)}


# --- the two sides --------------------------------------------------------------------------

class AdaptersOff:
    """The base side of an adapter run's report without a second copy in memory: the tuned peft model
    with its adapters (and trainable token rows) switched off, which computes exactly as the base."""

    def __init__(self, tuned):
        self.tuned = tuned


@contextmanager
def computing(side):
    """`with computing(side) as model:` the module to call for one side of the comparison (a plain
    model, or the tuned peft model with its adapters off for as long as the block runs)."""
    if isinstance(side, AdaptersOff):
        with side.tuned.disable_adapter():
            yield side.tuned
    else:
        yield side


# --- paired forward passes -------------------------------------------------------------------

@dataclass
class PairedStats:
    """Per-example sums from one pass of both models over the same token sequences."""
    nll_base: np.ndarray     # summed next-token loss over labelled positions
    nll_tuned: np.ndarray
    label_tokens: np.ndarray
    kl: np.ndarray           # summed KL(base ‖ tuned) over every predicted position
    kl_tokens: np.ndarray

    def summary(self) -> dict:
        n, k = self.label_tokens.sum(), self.kl_tokens.sum()
        base_loss = float(self.nll_base.sum() / n) if n else float("nan")
        tuned_loss = float(self.nll_tuned.sum() / n) if n else float("nan")
        return {"base_loss": base_loss, "tuned_loss": tuned_loss,
                "base_perplexity": float(np.exp(min(base_loss, 50.0))),
                "tuned_perplexity": float(np.exp(min(tuned_loss, 50.0))),
                "kl_per_token": float(self.kl.sum() / k) if k else float("nan"),
                "tokens": int(n), "sequences": int(len(self.kl))}


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def paired_pass(base, tuned, examples: list[Example], pad_id: int, device, batch_size: int = 8,
                kl_on_labels: bool = False) -> PairedStats:
    """Next-token loss of both models on labelled positions, KL(base ‖ tuned) on all positions (on the
    labelled ones only with `kl_on_labels`: a preference pair's responses)."""
    n = len(examples)
    sums = {k: np.zeros(n) for k in ("nll_base", "nll_tuned", "label_tokens", "kl", "kl_tokens")}
    for side in (base, tuned):
        with computing(side) as model:
            model.eval()
    for idx in length_batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        mask = batch["attention_mask"]
        predicted = (mask[:, 1:] * mask[:, :-1]).bool()      # positions whose next token is real
        targets = batch["input_ids"][:, 1:][predicted]
        labelled = (batch["labels"][:, 1:] != IGNORE_INDEX)[predicted]
        rows = torch.arange(len(idx), device=device)[:, None].expand_as(predicted)[predicted]
        hidden = []
        for side in (base, tuned):
            with computing(side) as model:
                hidden.append(model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask,
                                                  use_cache=False).last_hidden_state[:, :-1][predicted])
        chunk = max(1, HEAD_CHUNK_ELEMENTS // tuned.get_output_embeddings().weight.shape[0])
        for start in range(0, len(targets), chunk):
            sl = slice(start, start + chunk)
            with computing(base) as model:
                lp_base = F.log_softmax(_head(model, hidden[0][sl]), -1)
            lp_tuned = F.log_softmax(_head(tuned, hidden[1][sl]), -1)
            kl = (lp_base.exp() * (lp_base - lp_tuned)).sum(-1).clamp(min=0.0)
            nll_b = -lp_base.gather(1, targets[sl, None])[:, 0]
            nll_t = -lp_tuned.gather(1, targets[sl, None])[:, 0]
            lab = labelled[sl].double()
            counted = lab if kl_on_labels else torch.ones_like(lab)
            r = rows[sl].cpu().numpy()
            np.add.at(sums["kl"], [idx[i] for i in r], (kl.double() * counted).cpu().numpy())
            np.add.at(sums["kl_tokens"], [idx[i] for i in r], counted.cpu().numpy())
            np.add.at(sums["nll_base"], [idx[i] for i in r], (nll_b.double() * lab).cpu().numpy())
            np.add.at(sums["nll_tuned"], [idx[i] for i in r], (nll_t.double() * lab).cpu().numpy())
            np.add.at(sums["label_tokens"], [idx[i] for i in r], lab.cpu().numpy())
    return PairedStats(**sums)


# --- general text -------------------------------------------------------------------------------

def general_texts(path: str | None = None, *, n: int = GENERAL_CHUNKS, seed: int = 0) -> tuple[list[str], str]:
    """A fixed, seeded sample of general English passages and a name for where they came from.

    Default: CPython's own documentation text (`pydoc_data.topics`), read at run time, so no
    one's prose is copied into this repository and every machine samples the same passages.
    A user corpus is a UTF-8 text file whose passages are separated by blank lines.
    """
    if path:
        try:
            text = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read the general text corpus ({err.__class__.__name__}; "
                            "give a UTF-8 text file with passages separated by blank lines)") from None
        source = str(path)
        passages = [p for p in re.split(r"\n\s*\n", text)]
    else:
        from pydoc_data.topics import topics

        source = "pydoc_data.topics (CPython documentation)"
        passages = [p for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key])]
    # Prose paragraphs, not code listings or grammar rules.
    passages = [" ".join(p.split()) for p in passages]
    prose = [p for p in passages if len(p) >= 300 and p[0].isupper() and "::=" not in p and ">>>" not in p]
    if not prose:
        prose = [p for p in passages if p.strip()]
    if not prose:
        raise UserError(f"{path}: the general text corpus is empty")
    rng = random.Random(seed)
    return rng.sample(prose, min(n, len(prose))), source


def text_examples(tokenizer, texts: list[str], max_tokens: int = GENERAL_TOKENS) -> list[Example]:
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:max_tokens]
        if len(ids) >= 2:
            out.append(Example(ids, list(ids)))
    return out


# --- KL on the base model's own samples -----------------------------------------------------

@torch.no_grad()
def sample_from_base(base, tokenizer, n: int, *, max_new_tokens: int = SAMPLE_TOKENS, seed: int = 0,
                     device=None) -> list[Example]:
    """`n` continuations sampled (temperature 1, no truncation) from the base model's start token.

    Labels cover the sampled tokens only (through the first end-of-sequence token).
    """
    with computing(base) as model:  # an adapter run's base: its adapters off while it samples
        device = device or next(model.parameters()).device
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=torch.full((n, 1), start, dtype=torch.long, device=device),
                                 attention_mask=torch.ones((n, 1), dtype=torch.long, device=device),
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    examples = []
    for row in out.tolist():
        new = row[1:]
        stop = next((k for k, t in enumerate(new) if t == tokenizer.eos_token_id), len(new) - 1)
        ids = [start] + new[: stop + 1]
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    return examples


@dataclass(frozen=True)
class ReportOptions:
    general_text_file: str | None = None
    probe_files: tuple[str, ...] = ()
    side_by_side: int = 8
    kl_samples: int = 8
    batch_size: int = 8
    seed: int = 0
    benchmarks: tuple[str, ...] = ()  # lm-eval tasks for the forgetting section
    benchmark_limit: int = 100
    benchmark_tasks_dir: str | None = None


def load_probe_sets(files) -> tuple[list[probes.Probe], list[str]]:
    items, sources = probes.builtin_probes(), [f"builtin ({len(probes.BUILTIN_FACTS)} items)"]
    for f in files:
        extra = probes.load_probe_file(f)
        items += extra
        sources.append(f"{f} ({len(extra)} items)")
    return items, sources


def check_inputs(delta_args, seed: int) -> None:
    """Read the report's own inputs (DeltaArgs) before training, so a bad probe or corpus file fails in seconds."""
    if delta_args.delta_report:
        load_probe_sets(delta_args.probe_files)
        general_texts(delta_args.general_text_file, seed=seed)


def report_options(delta_args, eval_batch_size: int, seed: int) -> ReportOptions:
    """A training run's report options: its DeltaArgs, evaluation batch size and seed."""
    return ReportOptions(general_text_file=delta_args.general_text_file, probe_files=tuple(delta_args.probe_files),
                         side_by_side=delta_args.side_by_side_prompts, kl_samples=delta_args.kl_samples,
                         batch_size=eval_batch_size, seed=seed, benchmarks=tuple(delta_args.forgetting_benchmarks),
                         benchmark_limit=delta_args.benchmark_limit,
                         benchmark_tasks_dir=delta_args.benchmark_tasks_dir)


@dataclass(frozen=True)
class CompareSettings:
    """`deltatune compare`'s settings, the same for both report kinds (each reads what it needs)."""

    options: ReportOptions = ReportOptions()
    check: Check = Check()
    max_examples: int | None = None  # records of the data file used (default: the report kind's)
    max_seq_length: int = 1024
    max_new_tokens: int = 64
    allow_pickle: bool = False
    trust_remote_code: bool = False


def gain_point(headline: dict | None, measure: str, validation: dict | None) -> dict:
    """A run's gain for the frontier: the headline metric's when it was measured, else the fall of
    validation loss."""
    if headline:
        return {"gain": headline["gain"], "gain_ci": headline["gain_ci"], "significant": headline["significant"],
                "gain_measure": measure}
    if validation:
        loss = validation["loss"]
        return {"gain": loss["gain"], "gain_ci": loss["gain_ci"], "significant": loss["significant"],
                "gain_measure": "validation loss decrease"}
    return {"gain": None, "gain_ci": None, "significant": False, "gain_measure": "none"}


@contextmanager
def timed(seconds: dict, key: str):
    """One measure of a report: its time goes into `seconds[key]`, and its line (or bar) to stderr."""
    with stage(f"delta report: {key.replace('_', ' ')}"):
        start = time.perf_counter()
        yield
        seconds[key] = time.perf_counter() - start
