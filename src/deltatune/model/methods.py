"""What trains: full fine-tuning, LoRA/DoRA/QLoRA adapters, the head only, or chosen layers.

`apply_method(model, args)` (ModelArgs) returns the model to train (a `peft.PeftModel` for adapter methods,
the same model otherwise) with `requires_grad` set on exactly the parameters that train, and
`trainable_summary(model)` says what that is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from deltatune.errors import UserError
from deltatune.model.parts import embedding_parameter_names, find_blocks, head_module_names
from deltatune.model.stored import keep_frozen_stored

ADAPTER_METHODS = ("lora", "dora", "qlora")








def default_lora_targets(model: torch.nn.Module) -> str:
    """A peft target regex matching every nn.Linear inside the transformer blocks (not the head)."""
    prefix, blocks = find_blocks(model)
    leaves = sorted({name for name, m in blocks.named_modules() if isinstance(m, torch.nn.Linear)})
    if not leaves:
        raise UserError(f"{type(model).__name__}: its blocks have no nn.Linear layers for LoRA "
                        "(set lora_target_modules)")
    inner = "|".join(re.escape(name.split(".", 1)[1]) for name in leaves)  # drop the block index
    return rf"{re.escape(prefix)}\.\d+\.({inner})"




# --- applying a method ------------------------------------------------------------------------

def quantization_config(method: str):
    """The 4-bit NF4 load settings QLoRA trains on; None for every other method."""
    if method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def add_token_rows(model: torch.nn.Module, tokenizer, tokens: list[str]) -> None:
    """Grow the embeddings (and an untied output layer) for tokens just added to the tokenizer; their new rows
    start near the old rows' mean (transformers' resizing) and train under every method that allows it."""
    if not tokens:
        return
    model.resize_token_embeddings(len(tokenizer))
    model.deltatune_new_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _lora_config(model, args, task_type: str, new_head: bool):
    from peft import LoraConfig

    new_tokens = getattr(model, "deltatune_new_token_ids", None)
    # Added tokens train their own embedding (and output) rows beside the adapters; the rest stays frozen.
    rows = {name: new_tokens for name in (_input_embedding_name(model), *head_module_names(model))} if new_tokens \
        else None
    return LoraConfig(
        trainable_token_indices=rows,
        r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules) if args.lora_target_modules else default_lora_targets(model),
        use_dora=args.method == "dora",
        # A new classification head starts random: it must train, and be saved with the adapter.
        modules_to_save=head_module_names(model) if new_head else None,
        task_type=task_type,
    )


def _input_embedding_name(model: torch.nn.Module) -> str:
    table = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is table).rsplit(".", 1)[-1]


def _freeze_all_but(model: torch.nn.Module, trains) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trains(name)))


def _block_index(name: str, prefix: str) -> int | None:
    match = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def apply_method(model: torch.nn.Module, args, task_type: str = "CAUSAL_LM", new_head: bool = False
                 ) -> torch.nn.Module:
    """Set what trains according to `args.method` (ModelArgs); returns the model to train (maybe a PeftModel).
    A model loaded in a lower `torch_dtype` then keeps its frozen block weights there and the rest in float32
    (model/stored.py).

    task_type: peft's name for the objective ("CAUSAL_LM", "SEQ_CLS"). new_head: the model has a
    freshly initialised head (a classifier), which must train and be saved with an adapter.
    """
    model = set_trainable(model, args, task_type, new_head)
    if args.method != "qlora":  # bitsandbytes keeps its own dtypes
        keep_frozen_stored(model)
    return model


def set_trainable(model: torch.nn.Module, args, task_type: str, new_head: bool) -> torch.nn.Module:
    method = args.method
    if method == "full":
        _freeze_all_but(model, lambda name: True)
        return model
    if method in ADAPTER_METHODS:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model)
        try:
            return get_peft_model(model, _lora_config(model, args, task_type, new_head))
        except ValueError as err:  # peft's message for target names that match nothing
            raise UserError(f"lora_target_modules: {str(err).splitlines()[0]}") from None
    if method == "head_only":
        _freeze_all_but(model, lambda name: False)
        # By module, not by parameter name: a head tied to the input embeddings is listed under
        # the embeddings' name, and training it trains them too.
        for name in head_module_names(model):
            for p in getattr(model, name).parameters():
                p.requires_grad_(True)
        return model
    if method == "freeze":
        prefix, blocks = find_blocks(model)
        n_frozen = args.freeze_layers or 0
        if n_frozen > len(blocks):
            raise UserError(f"freeze_layers: {n_frozen} is more than the model's {len(blocks)} blocks")
        patterns = [re.compile(p) for p in args.trainable_modules or []]
        embeddings = embedding_parameter_names(model)

        def trains(name: str) -> bool:
            index = _block_index(name, prefix)
            if index is not None and index < n_frozen:
                return False
            if patterns:
                return any(p.search(name) for p in patterns)
            return name not in embeddings

        _freeze_all_but(model, trains)
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError(f"trainable_modules: {args.trainable_modules} match no parameter outside the "
                            f"{n_frozen} frozen blocks "
                            f"(names look like '{next(iter(dict(model.named_parameters())))}')")
        return model
    raise UserError(f"method '{method}' is not known")


# --- reporting what trains --------------------------------------------------------------------

@dataclass
class TrainableSummary:
    trainable: int
    total: int
    groups: list[str]  # module groups that train, block indices folded into ranges

    def as_record(self) -> dict:
        return {"trainable_parameters": self.trainable, "total_parameters": self.total,
                "trained_modules": self.groups}

    def lines(self) -> list[str]:
        share = 100.0 * self.trainable / max(self.total, 1)
        return [f"trainable parameters: {self.trainable:,} / {self.total:,} ({share:.2f}%)",
                "trained modules: " + (", ".join(self.groups) if self.groups else "none")]


def _ranges(indices: list[int]) -> str:
    out, start = [], None
    ordered = sorted(set(indices))
    for i, value in enumerate(ordered):
        if start is None:
            start = value
        if i + 1 == len(ordered) or ordered[i + 1] != value + 1:
            out.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(out)


def trainable_summary(model: torch.nn.Module) -> TrainableSummary:
    trainable = total = 0
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        trainable += p.numel()
        module = name.removeprefix("base_model.model.").rsplit(".", 1)[0].replace(".default", "")
        # One group per adapted layer (its A, B and DoRA magnitude together); a saved head by its own name.
        module = re.sub(r"\.(lora_A|lora_B|lora_magnitude_vector)$", " (lora)", module)
        module = module.replace(".modules_to_save", "")
        match = re.search(r"\.(\d+)\.", module)
        if match:
            key = module[: match.start()] + ".[{}]." + module[match.end():]
            groups.setdefault(key, []).append(int(match.group(1)))
        else:
            groups.setdefault(module, [])
    names = [key.format(_ranges(idx)) if idx else key for key, idx in groups.items()]
    return TrainableSummary(trainable, total, names)










