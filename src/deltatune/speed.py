"""Model-level speed and memory switches, applied once before training (config keys
`gradient_checkpointing`, `torch_compile`); measured in benchmarks/, not assumed."""

from __future__ import annotations

import torch

from deltatune.config import RunConfig


def prepare_for_training(model, cfg: RunConfig) -> None:
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and keyword arguments.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.torch_compile and not getattr(model.get_decoder(), "_compiled_call_impl", None):
        # Packed batches change shape every step: dynamic shapes avoid one recompile per shape.
        model.get_decoder().compile(dynamic=True)
