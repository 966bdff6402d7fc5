"""What trains: full fine-tuning, LoRA/DoRA/QLoRA adapters, the head only, or chosen layers.

`apply_method(model, cfg)` returns the model to train (a `peft.PeftModel` for adapter methods,
the same model otherwise) with `requires_grad` set on exactly the parameters that train, and
`trainable_summary(model)` says what that is. Adapter folders (PEFT format) are loaded back
with `load_adapter_model`, which follows the adapter's own record of its base model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.errors import UserError

ADAPTER_METHODS = ("lora", "dora", "qlora")


# --- finding the parts of a model -------------------------------------------------------------

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


def default_lora_targets(model: torch.nn.Module) -> str:
    """A peft target regex matching every nn.Linear inside the transformer blocks (not the head)."""
    prefix, blocks = find_blocks(model)
    leaves = sorted({name for name, m in blocks.named_modules() if isinstance(m, torch.nn.Linear)})
    if not leaves:
        raise UserError(f"{type(model).__name__}: its blocks have no nn.Linear layers for LoRA "
                        "(set lora_target_modules)")
    inner = "|".join(re.escape(name.split(".", 1)[1]) for name in leaves)  # drop the block index
    return rf"{re.escape(prefix)}\.\d+\.({inner})"


def without_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers stay in place); any other model as is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --- applying a method ------------------------------------------------------------------------

def check_method_available(method: str, device: torch.device) -> None:
    """Fail before anything loads when the method needs what this machine lacks."""
    if method != "qlora":
        return
    import importlib.util

    missing = []
    if device.type != "cuda":
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise UserError(f"method 'qlora' needs {' and '.join(missing)}; use method: lora on this machine")


def quantization_config(method: str):
    """The 4-bit NF4 load settings QLoRA trains on; None for every other method."""
    if method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _lora_config(model, cfg, task_type: str):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules) if cfg.lora_target_modules else default_lora_targets(model),
        use_dora=cfg.method == "dora",
        # A new classification head starts random: it must train, and be saved with the adapter.
        modules_to_save=head_module_names(model) if task_type == "SEQ_CLS" else None,
        task_type=task_type,
    )


def _freeze_all_but(model: torch.nn.Module, trains) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trains(name)))


def _block_index(name: str, prefix: str) -> int | None:
    match = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def apply_method(model: torch.nn.Module, cfg, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Set what trains according to `cfg.method`; returns the model to train (maybe a PeftModel).

    task_type: peft's name for the objective, "CAUSAL_LM" or "SEQ_CLS".
    """
    method = cfg.method
    if method == "full":
        _freeze_all_but(model, lambda name: True)
        return model
    if method in ADAPTER_METHODS:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model)
        try:
            return get_peft_model(model, _lora_config(model, cfg, task_type))
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
        n_frozen = cfg.freeze_layers or 0
        if n_frozen > len(blocks):
            raise UserError(f"freeze_layers: {n_frozen} is more than the model's {len(blocks)} blocks")
        patterns = [re.compile(p) for p in cfg.trainable_modules or []]
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
            raise UserError(f"trainable_modules: {cfg.trainable_modules} match no parameter outside the "
                            f"{n_frozen} frozen blocks (names look like '{next(iter(dict(model.named_parameters())))}')")
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


# --- adapter folders --------------------------------------------------------------------------

def is_adapter_dir(path) -> bool:
    return isinstance(path, Path) and (path / "adapter_config.json").is_file()


def adapter_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{folder / 'adapter_config.json'}: cannot read it ({err})") from None
    if not info.get("base_model_name_or_path"):
        raise UserError(f"{folder / 'adapter_config.json'}: no base_model_name_or_path (which model was adapted?)")
    return info


def load_adapter_model(folder: Path, load_base, *, trainable: bool = False):
    """PeftModel from an adapter folder; `load_base(name)` loads the base model the adapter names."""
    from peft import PeftModel

    base_name = adapter_info(folder)["base_model_name_or_path"]
    base = load_base(base_name)
    try:
        return PeftModel.from_pretrained(base, folder, is_trainable=trainable)
    except Exception as err:  # shape mismatches, missing files
        raise UserError(f"{folder}: cannot apply this adapter to {base_name} ({str(err).splitlines()[0]})") from None


def merge_adapter(adapter_dir: Path, out: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """Fold an adapter into its base model's weights and save a plain model folder (+ tokenizer)."""
    from deltatune.model import save_pretrained_atomic

    if not is_adapter_dir(adapter_dir):
        raise UserError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder (choose a new --out)")
    opts = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if adapter_info(adapter_dir).get("task_type") == "SEQ_CLS":
        from deltatune.classify import load_classifier

        model, tokenizer = load_classifier(str(adapter_dir), None, **opts)
    else:
        from deltatune.model import load_causal_lm

        model, tokenizer = load_causal_lm(str(adapter_dir), **opts)
    merged = model.merge_and_unload()
    save_pretrained_atomic(merged, tokenizer, out)
    return out
