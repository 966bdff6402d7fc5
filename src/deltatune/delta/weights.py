"""The weight change of a fine-tune, matrix by matrix: ‖ΔW‖_F/‖W_base‖_F, the effective rank of ΔW and the
intruder dimensions of W_tuned, grouped by layer and by module type.

An adapter run's ΔW is never merged into the weights: its norm and rank come from the adapters' factors, and
ΔW itself is formed one matrix at a time, for the intruders only.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from deltatune.delta.measures import computing
from deltatune.model.stored import row_chunks

EFFECTIVE_RANK_ENERGY = 0.90
INTRUDER_TOP_K = 10       # top singular vectors of W_tuned that are checked ...
INTRUDER_BASE_K = 20      # ... against this many top singular vectors of W_base
INTRUDER_COSINE = 0.5


def canonical_name(name: str) -> str:
    """Parameter name without peft's wrappers, so base and tuned (or adapter) names match."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


GENERIC_LEAVES = {"dense", "linear", "fc", "proj"}  # leaf names that say nothing alone (BERT has three `dense`)


def _module_type(name: str) -> str:
    parts = name.removesuffix(".weight").split(".")
    if parts[-1] not in GENERIC_LEAVES:
        return parts[-1]
    # The path inside the block (`attention.output.dense` vs `output.dense`), or the parent outside blocks.
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1:] if digits else parts[-2:])


def _layer(name: str) -> int | None:
    m = re.search(r"\.layers?\.(\d+)\.", name) or re.search(r"\.h\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def lora_layers(model) -> dict[str, object]:
    """{canonical weight name: peft LoRA layer} for every layer with an active adapter; each ΔW is computed
    when measured, one at a time (all of a 1B model's at once would be 4 GB)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {canonical_name(name) + ".weight": module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and _adapters(module)}


def _adapters(module) -> list[str]:
    """The layer's active adapters that are LoRA adapters."""
    return [a for a in getattr(module, "active_adapters", None) or [] if a in module.lora_A]


def adapter_delta(module) -> torch.Tensor:
    """ΔW = Σ B·A·scaling over the layer's active adapters, from peft, in float32; the base weight is only read."""
    return sum(module.get_delta_weight(a).detach().float() for a in _adapters(module))


def low_rank_core(module) -> torch.Tensor:
    """A small matrix with ΔW's singular values: with B = Q_B·R_B and Aᵀ = Q_A·R_A (all adapters' factors side by
    side), ΔW = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so ‖ΔW‖ and its effective rank cost (Σr)², not out × in."""
    adapters = _adapters(module)
    b = torch.cat([module.lora_B[a].weight.detach().float() * module.scaling[a] for a in adapters], dim=1)
    a = torch.cat([module.lora_A[a].weight.detach().float() for a in adapters], dim=0)
    return torch.linalg.qr(b)[1] @ torch.linalg.qr(a.T)[1].T


def frobenius_norm(weight: torch.Tensor) -> float:
    """‖W‖_F in float32; a weight kept in bfloat16 a slice of rows at a time (a 128k-token table is a GB in float32)."""
    if weight.dtype == torch.float32:
        return float(torch.linalg.vector_norm(weight))
    squares = sum(float(weight[rows].float().square().sum()) for rows in row_chunks(weight, torch.float32))
    return squares ** 0.5


def effective_rank(delta: torch.Tensor, energy: float = EFFECTIVE_RANK_ENERGY) -> int:
    """Smallest k whose top-k singular values hold `energy` of ‖ΔW‖_F² (0 for ΔW = 0).

    Squared singular values are the eigenvalues of the smaller Gram matrix, computed in
    float64: several times faster than an SVD on CPU and exact enough for a 90 % cut.
    """
    d = delta.double()
    gram = d.T @ d if d.shape[0] >= d.shape[1] else d @ d.T
    s2 = torch.linalg.eigvalsh(gram).clamp(min=0).flip(0)
    total = s2.sum()
    if total <= 0:
        return 0
    return int((torch.cumsum(s2, 0) / total < energy - 1e-12).sum().item()) + 1


def _top_left_singular(w: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, *w.shape)
    if min(w.shape) <= 4 * k:
        return torch.linalg.svd(w, full_matrices=False)[0][:, :k]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random projection for base and tuned
        u, _, _ = torch.svd_lowrank(w, q=min(k + 10, min(w.shape)), niter=4)
    return u[:, :k]


def intruder_dimensions(w_base: torch.Tensor, w_tuned: torch.Tensor, top_k: int = INTRUDER_TOP_K,
                        base_k: int = INTRUDER_BASE_K, threshold: float = INTRUDER_COSINE) -> int:
    """Top-`top_k` left singular vectors of W_tuned with |cos| < threshold to each of the top-`base_k` of W_base.

    Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence"): new
    high-ranking directions that the pre-trained matrix did not have.
    """
    u_t = _top_left_singular(w_tuned.float(), top_k)
    u_b = _top_left_singular(w_base.float(), base_k)
    cos = (u_t.T @ u_b).abs()
    return int((cos.max(dim=1).values < threshold).sum().item())


@torch.no_grad()
def weight_delta(base, tuned, *, top_n: int = 10, exclude: tuple[str, ...] = ()) -> dict:
    """Per weight matrix: ‖ΔW‖_F/‖W_base‖_F, effective rank of ΔW, intruder dimensions.

    `tuned` may be a peft model: its LoRA layers give ΔW = B·A·scaling without merging; its
    other matrices are compared with `base` by name. Matrices that did not change at all are
    counted but cost no SVD. Names starting with an `exclude` prefix are left out (a new
    classification head has no pre-trained counterpart).
    """
    lora = lora_layers(tuned)
    with computing(base) as model:  # adapters off: its other weights are the base's
        base_params = {canonical_name(n): p for n, p in model.named_parameters()}
    matrices = []
    seen = set()
    for name, p in tuned.named_parameters():
        cname = canonical_name(name)
        if p.ndim != 2 or "lora_" in name or cname in seen or cname.startswith(exclude):
            continue
        seen.add(cname)
        base_weight = base_params.get(cname)
        if cname in lora:  # ΔW's norm and rank from its factors; ΔW itself only for the intruders
            w_base, core = lora[cname].get_base_layer().weight.detach(), low_rank_core(lora[cname])
            delta_norm, rank = float(core.norm()), effective_rank(core)
            tuned_weight = (lambda w=w_base, m=lora[cname]: w.float().cpu() + adapter_delta(m).cpu())
        elif base_weight is p:  # one tensor on both sides (an adapter run's frozen weights): no copy, no change
            w_base, delta_norm, rank, tuned_weight = p.detach(), 0.0, 0, None
        elif base_weight is not None and base_weight.shape == p.shape:
            w_base = base_weight.detach().float().cpu()
            delta = p.detach().float().cpu() - w_base
            delta_norm = float(delta.norm())
            rank = effective_rank(delta) if delta_norm > 0 else 0
            tuned_weight = (lambda t=p: t.detach().float().cpu())
        else:
            continue
        base_norm = frobenius_norm(w_base)
        changed = delta_norm > 0
        matrices.append({
            "name": cname, "layer": _layer(cname), "module_type": _module_type(cname),
            "shape": list(p.shape), "delta_norm": delta_norm, "base_norm": base_norm,
            "relative_norm": delta_norm / base_norm if base_norm else float("inf") if changed else 0.0,
            "effective_rank": rank,
            "intruders": intruder_dimensions(w_base, tuned_weight()) if changed else 0,
            "lora": cname in lora,
        })
    return {"matrices": matrices, "changed_matrices": sum(m["delta_norm"] > 0 for m in matrices),
            "relative_norm": _aggregate_norm(matrices),
            "by_layer": _aggregate(matrices, "layer"), "by_module_type": _aggregate(matrices, "module_type"),
            "top": [m["name"] for m in sorted(matrices, key=lambda m: -m["relative_norm"])[:top_n]]}


def _aggregate_norm(matrices: list[dict]) -> float:
    base = sum(m["base_norm"] ** 2 for m in matrices)
    return (sum(m["delta_norm"] ** 2 for m in matrices) / base) ** 0.5 if base else 0.0


def _aggregate(matrices: list[dict], key: str) -> list[dict]:
    """Group matrices; relative norm of a group is ‖ΔW‖_F/‖W‖_F over the group's matrices together."""
    groups: dict = {}
    for m in matrices:
        groups.setdefault(m[key], []).append(m)
    rows = [{key: k, "matrices": len(ms), "relative_norm": _aggregate_norm(ms),
             "mean_effective_rank": float(np.mean([m["effective_rank"] for m in ms])),
             "intruders": sum(m["intruders"] for m in ms)} for k, ms in groups.items()]
    return sorted(rows, key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0)) \
        if key == "layer" else sorted(rows, key=lambda r: -r["relative_norm"])
