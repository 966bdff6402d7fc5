"""The memory plan: what a run will need, from the model's config.json and the run's settings, before the model loads.

The model is built on the meta device (every parameter's shape and dtype, no memory) and the run's
method is applied to it, so the trainable and frozen counts are the run's own. The rest is arithmetic:

- weights: frozen block matrices in their stored dtype (model/stored.py's rule), every other weight float32;
- per trainable parameter: its float32 gradient and AdamW's two moments (float32 or bfloat16);
- activations: what backward keeps per token and layer for per_device_train_batch_size x max_seq_length
  tokens (the attention scores too, which grow with the square of the row), or only each layer's input
  with gradient checkpointing;
- the loss head's chunk buffers, and on the host the Python process with its libraries.

The peak is their sum; benchmarks/scale.py checks it against measured peaks (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.errors import UserError
from deltatune.model.load import meta_model, weights_dtype
from deltatune.model.methods import set_trainable
from deltatune.model.stored import CHUNK_BYTES, DTYPES, modules_kept_stored

GB = 1e9
PROCESS_BYTES = int(0.45 * GB)  # Python, torch, transformers and peft imported: the host's floor
CUDA_CONTEXT_BYTES = int(0.6 * GB)  # the CUDA context and allocator reserve on a GPU
HEAD_CHUNK_BYTES = 2 * (1 << 24) * 4  # the loss's float32 logits chunk and its softmax (evaluate/loss.py)
QLORA_BYTES_PER_WEIGHT = 0.56  # NF4 with double-quantised scales


@dataclass(frozen=True)
class MemoryPlan:
    """The parts of a run's peak memory on one device, in bytes, and that device's total (None: unknown)."""

    parts: tuple[tuple[str, int], ...]
    where: str  # "host memory (RSS)" or "cuda:0 memory"
    total: int | None

    @property
    def peak(self) -> int:
        return sum(size for _, size in self.parts)

    @property
    def fits(self) -> bool:
        return self.total is None or self.peak <= self.total

    def lines(self) -> list[str]:
        width = max(len(name) for name, _ in self.parts)
        rows = [f"  {name:<{width}}  {size / GB:6.2f} GB" for name, size in self.parts]
        total = f" of {self.total / GB:.1f} GB" if self.total else ""
        return [f"memory plan ({self.where}{total}):", *rows, f"peak: {self.peak / GB:.1f} GB"]


@dataclass(frozen=True)
class Counts:
    """A model's parameters as the run will hold them (tied weights once)."""

    weight_bytes: int
    trainable: int
    total: int
    layers: int  # transformer blocks that backward runs through
    config: object  # the model's transformers config


def count_parameters(cfg, task) -> Counts:
    """Build the run's model on the meta device, apply its method, and count what each parameter will take."""
    args = cfg.model
    dtype = weights_dtype(args)
    counted = args.model_copy(update={"method": "lora"}) if args.method == "qlora" else args
    model = meta_model(args, task.new_head, "bfloat16" if args.method == "qlora" else dtype)
    with torch.device("meta"):
        model = set_trainable(model, counted, task.peft_task_type, task.new_head)
    stored = {id(p) for m in modules_kept_stored(model) for p in m.parameters(recurse=False)}
    weight_bytes, trainable, total = 0, 0, 0
    for name, p in model.named_parameters():  # a tied weight is listed once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            weight_bytes += 4 * p.numel()
        elif args.method == "qlora" and id(p) in stored and ".layers." in name:
            weight_bytes += int(QLORA_BYTES_PER_WEIGHT * p.numel())
        else:
            weight_bytes += (DTYPES[dtype].itemsize if id(p) in stored else 4) * p.numel()
    return Counts(weight_bytes, trainable, total, backward_layers(model, model.config), model.config)


def backward_layers(model, config) -> int:
    """Blocks at and above the lowest one with a trainable parameter (backward stops below it); all of them when
    the embeddings train."""
    layers = getattr(config, "num_hidden_layers", 0) or 0
    lowest = layers
    for name, p in model.named_parameters():
        if p.requires_grad:
            index = next((int(part) for part in name.split(".") if part.isdigit()), None)
            lowest = min(lowest, index if index is not None else (0 if "embed" in name else lowest))
    return layers - lowest


def activation_bytes(cfg, config, layers: int, bf16: bool, rows_per_example: int = 1) -> int:
    """What backward keeps: per token and layer the inputs of the attention and MLP matmuls and their products,
    and per row the attention scores (eager or SDPA's exact path on CPU); one layer's input with checkpointing."""
    batch, length = cfg.train.per_device_train_batch_size * rows_per_example, cfg.data.max_seq_length
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (getattr(config, "head_dim", None) or hidden // heads)
    width = 2 if bf16 else 4
    per_token = width * (6 * hidden + 2 * kv + 4 * inner)
    scores = 4 * heads * length * length * batch
    tokens = batch * length
    if cfg.memory.gradient_checkpointing:
        return tokens * 4 * hidden * layers + tokens * per_token + scores
    return layers * (tokens * per_token + scores)


def device_total(device: torch.device) -> int | None:
    """The device's memory: the GPU's, or the host's (a cgroup's limit where it is lower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    limit = Path("/sys/fs/cgroup/memory.max")
    text = limit.read_text().strip() if limit.is_file() else "max"
    return min(total, int(text)) if text.isdigit() else total


def plan_memory(cfg, task, device: torch.device, bf16: bool, world: int = 1) -> MemoryPlan:
    """The plan of `cfg` (RunConfig) for `task` on each of `world` processes' `device`, computing in bf16 or not
    (FSDP divides the weights, gradients and moments among the processes)."""
    counts = count_parameters(cfg, task)
    config = counts.config
    shards = world if cfg.parallel.parallelism == "fsdp" else 1
    moments = 4 if cfg.memory.optimizer_state_dtype == "bfloat16" else 8
    tokens = cfg.train.per_device_train_batch_size * task.rows_per_example * cfg.data.max_seq_length
    parts = [("weights as stored", counts.weight_bytes // shards),
             ("gradients (float32, trainable)", 4 * counts.trainable // shards),
             (f"AdamW moments ({cfg.memory.optimizer_state_dtype})", moments * counts.trainable // shards),
             ("activations" + (" (checkpointed)" if cfg.memory.gradient_checkpointing else ""),
              activation_bytes(cfg, config, counts.layers, bf16, task.rows_per_example)),
             ("loss head", HEAD_CHUNK_BYTES + CHUNK_BYTES + 8 * tokens * config.hidden_size)]
    parts.append(("CUDA context", CUDA_CONTEXT_BYTES) if device.type == "cuda" else ("process", PROCESS_BYTES))
    where = f"{device} memory" if device.type == "cuda" else "host memory (RSS)"
    return MemoryPlan(tuple(parts), where, device_total(device))


def what_would_fit(cfg, plan: MemoryPlan) -> list[str]:
    """Settings that lower the peak the most, each said once."""
    advice = []
    if cfg.model.method in ("full", "freeze"):
        advice.append("method: lora (gradients and moments for the adapters only)")
    if not cfg.memory.gradient_checkpointing:
        advice.append("gradient_checkpointing: true")
    if cfg.memory.optimizer_state_dtype == "float32" and cfg.parallel.parallelism != "fsdp":  # fsdp refuses it
        advice.append("optimizer_state_dtype: bfloat16")
    if cfg.train.per_device_train_batch_size > 1:
        advice.append("a smaller per_device_train_batch_size with more gradient_accumulation_steps")
    if cfg.model.torch_dtype == "float32":
        advice.append("torch_dtype: auto")
    return advice


def does_not_fit(cfg, plan: MemoryPlan) -> str:
    return (f"this run needs about {plan.peak / GB:.1f} GB of {plan.where} but the device has "
            f"{plan.total / GB:.1f} GB; try {'; '.join(what_would_fit(cfg, plan)) or 'a smaller model'} "
            "(deltatune train --force runs it anyway)")


def plan_lines(cfg, plan: MemoryPlan) -> list[str]:
    """`deltatune plan`'s text: the parts, what would fit when the peak exceeds the device, then `peak: N.N GB`."""
    lines = plan.lines()
    return lines if plan.fits else [*lines[:-1], does_not_fit(cfg, plan), lines[-1]]


def refuse_unless_fits(cfg, plan: MemoryPlan, force: bool) -> None:
    """One line naming the numbers and what would fit, when the plan exceeds the device (`force`: run anyway)."""
    if not plan.fits and not force:
        raise UserError(does_not_fit(cfg, plan))
