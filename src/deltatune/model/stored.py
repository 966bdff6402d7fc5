"""Frozen weights kept in a storage dtype (bfloat16, float16) and computed in the activations' dtype.

A frozen weight needs no float32 master copy: stored in bfloat16 it takes half the memory. Only the
*storage* changes: every matmul still runs in the compute dtype (float32 on a CPU without fast
half-precision matmuls, bfloat16 under autocast where it is fast), on a copy of the weight upcast for
that one call.

The upcast happens inside `StoredLinear`, an autograd Function that saves the low-precision weight
itself for backward and upcasts it again there. `F.linear(x, w.float())` would look the same but
let autograd keep each upcast float32 copy until backward: every layer's, the whole model's worth,
more memory than before instead of less.

`keep_frozen_stored` is the rule of `torch_dtype`: trainable parameters are float32 (the optimizer
updates float32 master copies); frozen nn.Linear and nn.Embedding weights stay in the checkpoint's
dtype (nearly all of the model), computed in float32 from exact upcasts, so the numbers are those of
float32 loading; every other weight (norms: small) is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.model.host_memory import page_out
from deltatune.model.parts import without_adapters

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


CHUNK_BYTES = 64 * 2**20  # the most of one weight upcast at a time (a 128k-token head is a GB in float32)


def row_chunks(weight: torch.Tensor, compute: torch.dtype) -> list[slice]:
    """The weight's output rows in slices whose upcast copy stays under CHUNK_BYTES (one slice: small weights)."""
    rows = max(1, CHUNK_BYTES // (weight.shape[1] * torch.finfo(compute).bits // 8))
    return [slice(i, i + rows) for i in range(0, weight.shape[0], rows)]


class StoredLinear(torch.autograd.Function):
    """y = x @ W^T + b for a frozen W (and b) kept in a storage dtype; computes in x's dtype
    (or the autocast dtype). Saves only W, the parameter itself, for backward: no copy. A big W is
    upcast a slice of output rows at a time, forward and backward (each output is the same dot product)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.compute_dtype = compute
        ctx.save_for_backward(weight)
        x = x.to(compute)
        # Grad mode is off inside forward: the upcast copies are freed as each call returns.
        parts = [F.linear(x, weight[rows].to(compute), None if bias is None else bias[rows].to(compute))
                 for rows in row_chunks(weight, compute)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        compute = ctx.compute_dtype
        grad_out = grad_out.to(compute)
        grad_x = None  # dL/dx = dL/dy · W; W and b are frozen
        for rows in row_chunks(weight, compute):
            part = grad_out[..., rows] @ weight[rows].to(compute)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None


def stored_forward(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return StoredLinear.apply(x, linear.weight, linear.bias)


def stored_lookup(embedding: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """A frozen embedding kept in a storage dtype gives float32 rows (the same values, upcast)."""
    return F.embedding(ids, embedding.weight, embedding.padding_idx, embedding.max_norm, embedding.norm_type,
                       embedding.scale_grad_by_freq, embedding.sparse).float()


def keep_frozen_stored(model: torch.nn.Module) -> int:
    """Apply the rule above to a model whose trainable parameters are set: the frozen linears and embeddings
    loaded in a lower dtype compute through StoredLinear / stored_lookup (a tied head and its embeddings stay
    one tensor), every other weight is made float32. Returns how many modules are kept low; a float32 model
    is left as it is (0)."""
    modules = modules_kept_stored(model)
    for module in modules:
        kept = stored_forward if type(module) is torch.nn.Linear else stored_lookup
        module.forward = kept.__get__(module)  # this instance only
    stored = {id(p) for module in modules for p in module.parameters(recurse=False)}
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float32 and id(p) not in stored:
                original = p.data
                p.data = original.float()  # the same Parameter (tied weights stay tied), float32 storage
                page_out([original])  # its pages of the mapped weight file are not read again
        for b in model.buffers():
            if b.is_floating_point() and b.dtype != torch.float32:
                b.data = b.data.float()
    return len(modules)


def modules_kept_stored(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose weights the rule keeps in their lower dtype: frozen nn.Linear and nn.Embedding loaded
    in bfloat16 or float16 (the memory plan counts them on a model built on the meta device)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    inner = without_adapters(model)
    # Added tokens' rows train inside peft's own layer, which reads the weight it wraps itself: that weight (and
    # a head tied to it) is float32.
    wrapped = {id(p) for m in inner.modules() if isinstance(m, TrainableTokensLayer)
               for p in m.base_layer.parameters()}
    kept = []
    for module in inner.modules():
        low = getattr(module, "weight", None) is not None and module.weight.dtype in (torch.bfloat16, torch.float16)
        own = list(module.parameters(recurse=False))
        if low and type(module) in (torch.nn.Linear, torch.nn.Embedding) and \
                not any(p.requires_grad or id(p) in wrapped for p in own):
            kept.append(module)
    return kept
