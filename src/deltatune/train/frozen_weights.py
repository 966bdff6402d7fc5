"""Frozen weights in a cheaper storage dtype while an adapter trains (config `frozen_weights_dtype`).

LoRA/DoRA leave the base weights of the blocks' linear layers untouched, so those weights need
no float32 master copy while training: stored in float16 they take half the memory, computed
through `model.stored.StoredLinear` (which says why it is an autograd Function).

Rounding: float16 keeps 11 significant bits (relative error <= 2^-11 per weight), bfloat16 8.
After training, `restore_frozen_weights` puts the original float32 values back, bit for bit,
by re-reading them from the model source: the tuned model is then evaluated and compared with
the base model on exactly the base weights it was evaluated with before training. (`torch_dtype`
instead keeps a bfloat16 checkpoint in bfloat16 from loading to saving: model/stored.py.)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from deltatune.errors import UserError
from deltatune.model import host_memory
from deltatune.model.parts import find_blocks, without_adapters
from deltatune.model.stored import DTYPES, stored_forward
from deltatune.runtime import distributed


def adapter_base_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """{name: nn.Linear} of the frozen base layers under peft's LoRA/DoRA layers inside the
    transformer blocks. Outside the blocks a weight may be shared (an output head tied to the
    embeddings), and changing its dtype would change the embeddings too."""
    from peft.tuners.lora import LoraLayer

    inner = distributed.unwrap(model)
    base = without_adapters(inner)
    prefix, _ = find_blocks(base)
    found = {}
    for name, module in base.named_modules():
        if not (isinstance(module, LoraLayer) and name.startswith(prefix + ".")):
            continue
        linear = module.get_base_layer()
        if type(linear) is torch.nn.Linear and not any(p.requires_grad for p in linear.parameters()):
            found[f"{name}.base_layer"] = linear
    return found


def store_frozen_weights(model: torch.nn.Module, dtype_name: str) -> int:
    """Keep the frozen base linears' weights in `dtype_name` and compute through StoredLinear;
    returns how many layers changed (0 for float32, which changes nothing). FSDP is refused by
    the config: it shards every weight of a block in one dtype."""
    if dtype_name == "float32":
        return 0
    linears = adapter_base_linears(model)
    if not linears:
        raise UserError(f"frozen_weights_dtype: {dtype_name}: no LoRA layer wraps an nn.Linear inside the "
                        "transformer blocks (check lora_target_modules, or set frozen_weights_dtype: float32)")
    dtype = DTYPES[dtype_name]
    # A model loaded from safetensors is memory-mapped from the file, and every page read counts
    # as resident memory until the whole mapping goes: the float32 block weights would stay
    # there beside their float16 copies. Each one's pages are handed back as soon as it is
    # converted (page_out), and the other frozen weights (embeddings, norms; ~20% of a small
    # model) are copied out of the file, which lets the mapping go.
    with torch.no_grad():
        for linear in linears.values():
            original = linear.weight.data
            linear.weight.data = original.to(dtype)  # the same Parameter, new storage
            host_memory.page_out([original])
            linear.forward = stored_forward.__get__(linear)  # this instance only
        for p in distributed.unwrap(model).parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                original = p.data
                p.data = original.clone()
                host_memory.page_out([original])
    print(f"frozen_weights_dtype: {dtype_name} storage for the {len(linears)} frozen linear layers under adapters "
          "while training", flush=True)
    return len(linears)


def _plain_name(name: str) -> str:
    """A module's name in the plain base model: without peft's wrapper prefixes."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def restore_frozen_weights(model: torch.nn.Module, load_base) -> int:
    """Undo `store_frozen_weights`: the original float32 weights, re-read from the model source by
    `load_base()` (a fresh copy of the base model), and nn.Linear's own forward. Returns how many
    layers were restored; `load_base` is not called when none was changed."""
    inner = distributed.unwrap(model)
    stored = {name: m for name, m in inner.named_modules()
              if getattr(vars(m).get("forward"), "__func__", None) is stored_forward}
    if not stored:  # float32, the default: nothing to undo
        return 0
    fresh = without_adapters(load_base())
    originals = {_plain_name(name): m for name, m in fresh.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        for name, linear in stored.items():
            original = originals.get(_plain_name(name))
            if original is None or original.weight.shape != linear.weight.shape:
                raise UserError(f"frozen_weights_dtype: cannot find {_plain_name(name)} in the reloaded base model "
                                "to restore its float32 weight (set frozen_weights_dtype: float32)")
            linear.weight.data = original.weight.data.to(linear.weight.device)
            del linear.forward
    return len(stored)


@contextmanager
def frozen_weights(model: torch.nn.Module, dtype_name: str, load_base):
    """While inside, the frozen base linears are stored in `dtype_name`; on the way out (normal
    exit only: after an error the model is not evaluated or saved) their float32 weights come
    back, bit for bit, from `load_base()`. float32, the default, changes nothing."""
    changed = store_frozen_weights(model, dtype_name)
    yield model
    if changed:  # only what it stored: weights kept in torch_dtype are the model's own, as loaded
        restore_frozen_weights(model, load_base)
