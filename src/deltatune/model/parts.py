"""Where the parts of a transformers model are: its blocks, its head, its embeddings.

Found by structure (a ModuleList as long as the layer count, the children outside the
backbone), not by architecture names, so any family transformers loads is covered.
"""

from __future__ import annotations

import inspect

import torch

from deltatune.errors import UserError


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, ModuleList) of the transformer blocks: the list as long as the layer count."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and (n_layers is None or len(m) == n_layers)]
    if not candidates:
        raise UserError(f"{type(model).__name__}: cannot find its list of transformer blocks "
                        "(use method: full, or name modules with trainable_modules)")
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Top-level modules outside the backbone: `lm_head`, or the classification head (`score`, `classifier`)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    names = [name for name, child in model.named_children()
             if child is not backbone and any(True for _ in child.parameters())]
    if not names:
        raise UserError(f"{type(model).__name__}: no output head found outside the backbone")
    return names


def embedding_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters of every embedding table (token, position, token type)."""
    return {f"{mod_name}.{p_name}" if mod_name else p_name
            for mod_name, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)
            for p_name, _ in mod.named_parameters(recurse=False)}


def without_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers stay in place); any other model as is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def accepts_token_types(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `token_type_ids` (BERT-family encoders; decoders do not)."""
    return "token_type_ids" in inspect.signature(without_adapters(model).forward).parameters
