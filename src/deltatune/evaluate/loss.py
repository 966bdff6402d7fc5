"""Output head + cross-entropy in chunks, without ever holding [tokens x vocabulary] logits.

The loss is a scalar at the end of the graph, so its gradients with respect to the hidden
states and the head weight can be computed in the forward pass, chunk by chunk, and only
scaled by the incoming gradient in backward. Each chunk's logits live just long enough to
produce its loss and gradients: peak memory is one chunk of logits instead of all of them
(plus their saved softmax), and nothing is recomputed, so it costs the same three matmuls as
autograd's version. The chunk size bounds the logits buffer to `max_chunk_elements` floats.
"""

from __future__ import annotations

import torch

MAX_CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32 logits per chunk


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
        w = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start: start + chunk_rows]
            t = targets[start: start + chunk_rows]
            logits = (h @ w.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_hidden or want_weight:
                # d(lse - logit_t)/d logits = softmax - onehot(t), computed in place over the logits buffer.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                probs = probs.to(h.dtype)
            if want_hidden:
                torch.matmul(probs, w, out=grad_hidden[start: start + chunk_rows])
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
