"""Preference objectives on chosen/rejected pairs: DPO, IPO, SimPO and ORPO, and their evaluation.

A pair's two sides run through the model in the same forward pass (`collate` puts them in
adjacent rows: 2i chosen, 2i+1 rejected); the output head runs at response positions only,
and each side's log-probability log π(y|x) is the sum over its response tokens. With the
reference's log-probabilities ρ, the per-pair losses are (σ the logistic function, |y| a
response's token count, ā = log π(y|x)/|y| its mean per token):

- DPO:   −log σ(β·[(log π_c − ρ_c) − (log π_r − ρ_r)])
- IPO:   ([(log π_c − ρ_c) − (log π_r − ρ_r)] − 1/(2τ))², τ given as `beta`
- SimPO: −log σ(β·(ā_c − ā_r) − γ), no reference
- ORPO:  −ā_c − λ·log σ(log odds(c) − log odds(r)), odds(y) = p/(1 − p) with p = exp(ā), no reference

A loss is the mean over pairs, so a step's units are its pairs (`pairs_in`) and gradient
accumulation divides by the pairs of the whole step. The reference is the base model: for
LoRA/DoRA the same model with its adapters switched off (no copy), otherwise log-probabilities
computed in one pass before training and carried by the examples (`reference_logp`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from deltatune.data.batching import collate, length_batches
from deltatune.data.examples import IGNORE_INDEX, Example
from deltatune.data.formats import Record
from deltatune.errors import UserError
from deltatune.evaluate.generate import generate
from deltatune.evaluate.loss import evaluation_mode
from deltatune.files import writing
from deltatune.runtime import distributed
from deltatune.runtime.precision import autocast

REFERENCE_FREE = ("simpo", "orpo")
ADAPTER_METHODS = ("lora", "dora", "qlora")


@dataclass(frozen=True)
class Objective:
    """One preference loss and its constants; `reference` says where ρ comes from: `adapters_off`
    (the same model with its LoRA adapters disabled), `stored` (the examples' `reference_logp`,
    computed before training) or `none` (a reference-free loss)."""

    loss_type: str = "dpo"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    reference: str = "adapters_off"

    @property
    def length_normalised(self) -> bool:
        return self.loss_type in REFERENCE_FREE


def objective_of(args, method: str) -> Objective:
    """The Objective of a run's PreferenceArgs and its method (which decides where the reference comes from)."""
    reference = "none" if args.loss_type in REFERENCE_FREE else (
        "adapters_off" if method in ADAPTER_METHODS else "stored")
    return Objective(args.loss_type, args.beta, args.simpo_gamma, args.orpo_lambda, reference)


def pairs_in(batch: dict) -> int:
    """A preference batch's units: its pairs (those of a blank micro-batch have no labels and count 0)."""
    return int((batch["labels"][0::2, 1:] != IGNORE_INDEX).any(dim=1).sum())


def response_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's label tokens [rows] in float32, label tokens per row [rows])."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = out.last_hidden_state[:, :-1][keep]  # the head runs at response positions only
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    token_logps = logits.gather(1, targets[keep][:, None])[:, 0] - logits.logsumexp(dim=-1)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    sums = torch.zeros(keep.shape[0], dtype=token_logps.dtype, device=keep.device).index_add(0, rows, token_logps)
    return sums, keep.sum(dim=1)


def reference_logps(model, batch: dict, objective: Objective) -> torch.Tensor | None:
    """ρ for each row: the examples' stored values, or the model with its adapters off (None: reference-free)."""
    if objective.reference == "none":
        return None
    if objective.reference == "stored":
        if "reference_logps" not in batch:
            raise UserError("the reference log-probabilities were not computed before training (this is a bug)")
        return batch["reference_logps"]
    with torch.no_grad(), model.disable_adapter():
        return response_logps(model, batch)[0].double()


def pair_terms(objective: Objective, logp_c: torch.Tensor, logp_r: torch.Tensor, n_c: torch.Tensor,
               n_r: torch.Tensor, ref_c: torch.Tensor | None = None, ref_r: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) from per-side summed log-probabilities.

    The reward is what each side scores in the loss: β·log(π/ρ) (DPO), log(π/ρ) (IPO), β·ā
    (SimPO) and ā (ORPO); a pair is ranked right when the chosen reward is the higher."""
    o = objective
    if o.loss_type in ("dpo", "ipo"):
        ratio_c, ratio_r = logp_c - ref_c, logp_r - ref_r
        if o.loss_type == "dpo":
            return -F.logsigmoid(o.beta * (ratio_c - ratio_r)), o.beta * ratio_c, o.beta * ratio_r
        return (ratio_c - ratio_r - 1.0 / (2.0 * o.beta)) ** 2, ratio_c, ratio_r
    mean_c, mean_r = logp_c / n_c.clamp(min=1), logp_r / n_r.clamp(min=1)
    if o.loss_type == "simpo":
        return -F.logsigmoid(o.beta * (mean_c - mean_r) - o.simpo_gamma), o.beta * mean_c, o.beta * mean_r

    def log_odds(mean_logp):  # log(p / (1 − p)) with p = exp(mean log-probability) < 1
        return mean_logp - torch.log(-torch.expm1(mean_logp.clamp(max=-1e-7)))
    return -mean_c - o.orpo_lambda * F.logsigmoid(log_odds(mean_c) - log_odds(mean_r)), mean_c, mean_r


def score_batch(model, batch: dict, objective: Objective | None) -> dict[str, torch.Tensor]:
    """Per pair of a batch: each side's summed log-probability and response tokens, and (with an objective)
    the loss and the rewards; the log-probabilities in float64, since the per-pair arithmetic is tiny."""
    logps, counts = response_logps(model, batch)
    logps = logps.double()
    scores = {"logp_chosen": logps[0::2], "logp_rejected": logps[1::2], "tokens_chosen": counts[0::2],
              "tokens_rejected": counts[1::2]}
    if objective is not None:
        ref = reference_logps(model, batch, objective)
        ref_c, ref_r = (ref[0::2], ref[1::2]) if ref is not None else (None, None)
        scores["loss"], scores["reward_chosen"], scores["reward_rejected"] = pair_terms(
            objective, scores["logp_chosen"], scores["logp_rejected"], counts[0::2], counts[1::2], ref_c, ref_r)
    return scores


def preference_loss(model, batch: dict, objective: Objective) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(summed loss over the batch's pairs, pairs, {statistic: sum over pairs}) — a LossFn."""
    s = score_batch(model, batch, objective)
    real = s["tokens_chosen"] > 0  # a blank micro-batch (torchrun's short last step) adds nothing
    weight = real.double()
    reward_c, reward_r = s["reward_chosen"].detach(), s["reward_rejected"].detach()
    stats = {"reward_accuracy": ((reward_c > reward_r).double() * weight).sum(),
             "reward_margin": ((reward_c - reward_r) * weight).sum(), "reward_chosen": (reward_c * weight).sum(),
             "reward_rejected": (reward_r * weight).sum(), "logp_chosen": (s["logp_chosen"].detach() * weight).sum(),
             "logp_rejected": (s["logp_rejected"].detach() * weight).sum()}
    return (s["loss"] * weight).sum(), real.sum(), stats


def loss_function(objective: Objective):
    """The LossFn of an objective."""
    return functools.partial(preference_loss, objective=objective)


# --- scoring held-out pairs ------------------------------------------------------------------

@dataclass
class PairScores:
    """Per pair, in the examples' order: each side's summed log-probability and response tokens,
    the reference's (None: reference-free), the loss and the rewards."""
    logp_chosen: np.ndarray
    logp_rejected: np.ndarray
    tokens_chosen: np.ndarray
    tokens_rejected: np.ndarray
    loss: np.ndarray
    reward_chosen: np.ndarray
    reward_rejected: np.ndarray

    def margins(self, per_token: bool) -> np.ndarray:
        """The model's own preference, log π(c) − log π(r) (per token for the length-normalised losses):
        defined for any model, base or tuned, reference or not."""
        if per_token:
            return self.logp_chosen / np.maximum(self.tokens_chosen, 1) - (
                self.logp_rejected / np.maximum(self.tokens_rejected, 1))
        return self.logp_chosen - self.logp_rejected


@torch.no_grad()
def score_pairs(model, examples: list[Example], objective: Objective | None, *, batch_size: int, pad_id: int,
                device: torch.device, bf16: bool = False, max_tokens: int | None = None) -> PairScores:
    """Every pair's log-probabilities, loss and rewards under `model` (batch by batch, nothing but sums
    kept); with `objective` None the log-probabilities only (loss and rewards NaN)."""
    n = len(examples)
    cols = {k: np.full(n, np.nan) for k in PairScores.__dataclass_fields__}
    with evaluation_mode(model):
        for idx in length_batches(examples, batch_size, max_tokens):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with autocast(device, bf16):
                values = distributed.call(model, score_batch, batch, objective)
            for key, value in values.items():
                cols[key][idx] = value.double().cpu().numpy()
    return PairScores(**cols)


def evaluate_pairs(model, tokenizer, examples: list[Example], records: list[Record], objective: Objective | None, *,
                   batch_size: int, device, bf16: bool = False, max_tokens: int | None = None,
                   generate_for: int = 0, max_new_tokens: int = 64) -> dict:
    """{loss, preference_accuracy, reward_accuracy, reward_margin, logp_chosen, logp_rejected, pairs,
    predictions}: one model on held-out pairs. `predictions` has one entry per pair (its prompt, the
    chosen response as reference, whether the model ranks the pair right, its margin) and, for the
    first `generate_for` pairs, the model's greedy answer to the prompt. With `objective` None (no run's
    loss or reference is known): the log-probabilities and preference accuracy only."""
    if not examples:
        return {}
    scores = score_pairs(model, examples, objective, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                         device=device, bf16=bf16, max_tokens=max_tokens)
    margins = scores.margins(objective is not None and objective.length_normalised)
    by_source = {r.source: r for r in records}
    pairs = [by_source[ex.source] for ex in examples]
    predictions = [{"prompt": r.messages[-1]["content"], "reference": r.chosen[-1]["content"],
                    "hit": bool(m > 0), "margin": float(m)} for r, m in zip(pairs, margins)]
    if generate_for:
        outputs = generate(model, tokenizer, [r.messages for r in pairs[:generate_for]],
                           max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
        for p, out in zip(predictions, outputs):
            p["output"] = out
    result = {"preference_accuracy": float((margins > 0).mean()), "logp_chosen": float(scores.logp_chosen.mean()),
              "logp_rejected": float(scores.logp_rejected.mean()), "pairs": len(examples)}
    if objective is not None:
        result = {"loss": float(scores.loss.mean()), **result,
                  "reward_accuracy": float((scores.reward_chosen > scores.reward_rejected).mean()),
                  "reward_margin": float((scores.reward_chosen - scores.reward_rejected).mean())}
    return {**result, "predictions": predictions}


# --- the reference, computed once before training ---------------------------------------------

REFERENCE_FILE = "reference_logps.safetensors"


def attach_reference(model, splits: dict[str, list[Example]], objective: Objective, *, fingerprint: str, out_dir,
                     reuse: bool, batch_size: int, pad_id: int, device, bf16: bool = False,
                     max_tokens: int | None = None) -> None:
    """Give every side of every pair its reference log-probability (`reference_logp`), for an objective
    whose reference is `stored`: `model` is still the base. They are written to output_dir once;
    a resume (`reuse`) reads them back when they were computed on the same training data."""
    if objective.reference != "stored":
        return
    path = out_dir / REFERENCE_FILE
    stored = load_file(path) if reuse and path.is_file() else {}
    computed_on = bytes(stored.pop("fingerprint", torch.zeros(0, dtype=torch.uint8)).tolist()).hex()
    if stored and set(stored) == set(splits) and computed_on == fingerprint:
        values = {name: stored[name].tolist() for name in splits}
    else:
        values = {name: _logps(model, examples, objective, batch_size, pad_id, device, bf16, max_tokens)
                  for name, examples in splits.items()}
        if distributed.is_main():
            tensors = {name: torch.tensor(v, dtype=torch.float64) for name, v in values.items()}
            tensors["fingerprint"] = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8)
            with writing(REFERENCE_FILE, out_dir):
                tmp = path.with_suffix(".tmp")
                save_file(tensors, tmp)
                tmp.replace(path)
    for name, examples in splits.items():
        for ex, (chosen, rejected) in zip(examples, values[name]):
            ex.reference_logp, ex.rejected.reference_logp = chosen, rejected
    splits_text = ", ".join(f"{len(v)} {k} pairs" for k, v in splits.items())
    print(f"reference log-probabilities: {splits_text} ({path.name})", flush=True)


def _logps(model, examples, objective, batch_size, pad_id, device, bf16, max_tokens) -> list[list[float]]:
    """[[chosen, rejected] per pair]: the base's summed response log-probabilities."""
    scores = score_pairs(model, examples, None, batch_size=batch_size, pad_id=pad_id, device=device, bf16=bf16,
                         max_tokens=max_tokens)
    return [[c, r] for c, r in zip(scores.logp_chosen.tolist(), scores.logp_rejected.tolist())]
