"""The losses: summed cross-entropy and its label count, for training and evaluation alike.

Every loss function returns (summed loss, number of units it is a sum over: label tokens,
examples or pairs), so a caller can normalise by the units of a whole optimizer step
(training) or of a whole dataset (evaluation) instead of averaging averages. A loss may add a
third element: a dict of further sums over the same units (a preference loss's reward
accuracy and margins), which the training log reports as means.

Output head + cross-entropy in chunks, without ever holding [tokens x vocabulary] logits:
the loss is a scalar at the end of the graph, so its gradients with respect to the hidden
states and the head weight can be computed in the forward pass, chunk by chunk, and only
scaled by the incoming gradient in backward. Each chunk's logits live just long enough to
produce its loss and gradients: peak memory is one chunk of logits instead of all of them
(plus their saved softmax), and nothing is recomputed, so it costs the same three matmuls as
autograd's version. The chunk size bounds the logits buffer to `max_chunk_elements` floats.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from deltatune.data.batching import collate, length_batches
from deltatune.data.examples import IGNORE_INDEX, Example
from deltatune.model.stored import row_chunks
from deltatune.runtime import distributed
from deltatune.runtime.precision import autocast

MAX_CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32 logits per chunk
LossFn = Callable[[torch.nn.Module, dict], tuple]  # (summed loss, units[, {name: summed statistic}])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        # A frozen head (LoRA, freezing) needs no weight gradient: skipping it saves a
        # [vocabulary x hidden] matmul and a dense buffer the size of the embeddings per step.
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are scored in float32
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        # A frozen head kept in bfloat16 (torch_dtype) is upcast a slice of vocabulary rows at a time, for each
        # chunk: a whole float32 copy of a 128k-token head would be a GB.
        slices = row_chunks(weight, hidden.dtype) if weight.dtype != hidden.dtype else [slice(None)]
        w = weight.to(hidden.dtype) if len(slices) == 1 else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start: start + chunk_rows]
            t = targets[start: start + chunk_rows]
            logits = (h @ w.t() if w is not None else
                      torch.cat([h @ weight[rows].to(h.dtype).t() for rows in slices], dim=1)).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_hidden or want_weight:
                # d(lse - logit_t)/d logits = softmax - onehot(t), computed in place over the logits buffer.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                probs = probs.to(h.dtype)
            if want_hidden and w is not None:
                torch.matmul(probs, w, out=grad_hidden[start: start + chunk_rows])
            elif want_hidden:
                part = grad_hidden[start: start + chunk_rows].zero_()
                for rows in slices:
                    part.addmm_(probs[:, rows], weight[rows].to(h.dtype))
            if want_weight:
                chunk_grad = probs.t().matmul(h).to(acc)
                grad_weight = chunk_grad if grad_weight is None else grad_weight.add_(chunk_grad)
        if want_weight and grad_weight is None:  # no rows (a rank's blank micro-batch): a zero gradient
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        # Kept as attributes, not saved tensors: backward scales them in place and hands them on,
        # so no second copy of a [vocabulary x hidden] gradient exists; a second backward through
        # the same graph then fails loudly (AttributeError) instead of scaling twice.
        ctx.grad_hidden = grad_hidden
        ctx.grad_weight = grad_weight.to(weight.dtype) if want_weight else None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = []
        for name in ("grad_hidden", "grad_weight"):
            grad = getattr(ctx, name)
            delattr(ctx, name)
            grads.append(grad.mul_(grad_output.to(grad.dtype)) if grad is not None else None)
        return grads[0], grads[1], None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         max_chunk_elements: int = MAX_CHUNK_ELEMENTS) -> torch.Tensor:
    """sum over rows of cross_entropy(hidden @ weight.T, targets): hidden [N, d], weight [V, d], targets [N]."""
    chunk_rows = max(1, max_chunk_elements // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


def class_targets(labels: torch.Tensor) -> torch.Tensor:
    """The one class id per row (every other position is IGNORE_INDEX, which is smaller)."""
    return labels.max(dim=1).values


CLASSIFIER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def classifier_inputs(batch: dict) -> dict:
    """What a sequence classifier's forward takes from a batch (token types where the examples have them)."""
    return {k: batch[k] for k in CLASSIFIER_INPUTS if k in batch}


def classification_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the batch, number of examples)."""
    logits = model(**classifier_inputs(batch)).logits.float()
    targets = class_targets(batch["labels"])
    return F.cross_entropy(logits, targets, reduction="sum"), torch.tensor(len(targets), device=logits.device)



def label_tokens(batch: dict) -> int:
    """The units of a causal LM or classification batch: its label positions (the first is never predicted)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of label tokens) of next-token prediction.

    The output head runs only at positions that carry a label: prompts and padding are never
    projected onto the vocabulary, which is most of the head's cost in SFT; and it runs in
    chunks with the cross-entropy (linear_cross_entropy), so the full logits never exist at once.
    A packed batch (data/batching.py) brings `position_ids` and no mask: transformers isolates its examples.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    inputs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else \
        {"attention_mask": batch["attention_mask"]}
    out = model.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **inputs)
    hidden = out.last_hidden_state[:, :-1][keep]
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap and isinstance(head, torch.nn.Linear) and head.bias is None:
        return linear_cross_entropy(hidden, head.weight, targets[keep]), keep.sum()
    logits = head(hidden).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()


@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, pad_id: int, device: torch.device,
              bf16: bool = False, loss_fn: LossFn = causal_lm_loss, max_tokens: int | None = None) -> tuple[float, int]:
    """Token-weighted mean loss over examples, streamed batch by batch (no logits are kept)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with evaluation_mode(model):
        for idx in length_batches(examples, batch_size, max_tokens):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with autocast(device, bf16):
                loss_sum, n, *_ = distributed.call(model, loss_fn, batch)
            total += loss_sum.double()
            count += n
    n_tokens = int(count.item())
    return (total.item() / n_tokens if n_tokens else float("nan")), n_tokens


@contextmanager
def evaluation_mode(model):
    """model.eval() inside, and the mode it had (train or eval) back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
