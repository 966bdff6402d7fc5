"""The training loop: one explicit function, `fit`, readable in a single pass.

θ ← θ − η·∇θ L: AdamW over the trainable parameters, the loss normalised by the number of
label tokens in the whole optimizer step (so gradient accumulation changes nothing but memory),
warm-up then linear/cosine/constant decay, gradient clipping, periodic logging, evaluation,
early stopping and checkpoints. One host sync per step decides whether the update is finite
(a non-finite loss or gradient norm skips the update instead of poisoning AdamW's moments);
other syncs (`.item()`) happen only when something is logged. Checkpoints and exact resume
live in checkpoint.py; the loop calls them at its start and after a step.
"""

from __future__ import annotations

import functools
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from deltatune import dist_checkpoint, distributed, host_memory
from deltatune.checkpoint import StopRequested, crash_point, data_fingerprint, latest_checkpoint, stop_on_signals
from deltatune.config import RunConfig
from deltatune.data import IGNORE_INDEX, Example, collate, length_batches, micro_batches, step_groups
from deltatune.errors import UserError
from deltatune.head_loss import linear_cross_entropy
from deltatune.methods import find_blocks, without_adapters
from deltatune.optimizers import AdamWBf16Moments
from deltatune.packing import collate_packed, model_mask, packed_micro_batches
from deltatune.speed import prepare_for_training

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


# --- loss --------------------------------------------------------------------------------------

def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of label tokens) of next-token prediction.

    The output head runs only at positions that carry a label: prompts and padding are never
    projected onto the vocabulary, which is most of the head's cost in SFT; and it runs in
    chunks with the cross-entropy (head_loss.py), so the full logits never exist at once.
    A packed batch (packing.py) brings `position_ids` and a 4D block-diagonal mask.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    mask = batch["attention_mask"]
    extra = {}
    if "position_ids" in batch:  # a packed batch: per-example positions and a 4D block mask
        mask = model_mask(model, mask, next(model.parameters()).dtype)
        extra["position_ids"] = batch["position_ids"]
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, **extra)
    hidden = out.last_hidden_state[:, :-1][keep]
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap and isinstance(head, torch.nn.Linear) and head.bias is None:
        return linear_cross_entropy(hidden, head.weight, targets[keep]), keep.sum()
    logits = head(hidden).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()


# --- precision -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _bf16_faster_on_cpu() -> bool:
    """Measure, don't assume: CPUs without native bf16 run bf16 matmuls 100x slower, not faster."""
    def seconds(dtype):
        a = torch.randn(256, 256, dtype=dtype)
        a @ a
        start = time.perf_counter()
        for _ in range(3):
            a @ a
        return time.perf_counter() - start
    return seconds(torch.bfloat16) < seconds(torch.float32)


def resolve_bf16(setting, device: torch.device) -> bool:
    """Decide bf16 autocast from the config value and what the hardware does."""
    if setting is False:
        return False
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = _bf16_faster_on_cpu()
    if setting is True and not supported:
        raise UserError(f"bf16: true, but this {device.type} has no fast bfloat16 support "
                        "(set bf16: auto or false)")
    return supported


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


# --- schedule and optimizer ---------------------------------------------------------------

def lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)
    return factor


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Biases and norm gains are not weights to shrink towards zero.
            (no_decay if p.ndim < 2 else decay).append(p)
    if not decay and not no_decay:
        raise UserError("no parameter is trainable (check method / freeze settings)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer_state_dtype == "bfloat16":  # half the moments' memory, same update rule
        return AdamWBf16Moments(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, seed=cfg.seed)
    # Fused AdamW (one kernel per tensor, also on CPU): measured 5x faster than foreach on this
    # 2-core CPU over SmolLM2-sized parameters, same update to float rounding.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused, foreach=None if fused else True)


@contextmanager
def optimizer_steps_in_backward(optimizer: torch.optim.Optimizer, enabled: bool):
    """With `optimizer_in_backward`, update each parameter the moment its gradient is complete
    and free that gradient at once: a full model's gradients never exist together, which saves
    their memory (4 bytes a parameter in float32). Yields None when disabled.

    The update is AdamW's own (`optimizer.step()` on one parameter at a time), so it equals the
    ordinary step bit for bit; what cannot exist is a *global* gradient norm before the update,
    hence no clipping (config.py refuses max_grad_norm > 0 with it). Only the last micro-batch's
    backward of a step is armed: earlier ones accumulate as usual.
    """
    if not enabled:
        yield None
        return
    steps = _InBackwardSteps(optimizer)
    handles = [p.register_post_accumulate_grad_hook(steps.update) for p in steps.home]
    try:
        yield steps
    finally:
        for handle in handles:
            handle.remove()


class _InBackwardSteps:
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.groups = optimizer.param_groups
        self.home = {p: group for group in self.groups for p in group["params"]}
        self.armed = self.finite = False
        self.norm_sq = torch.zeros((), dtype=torch.float64)  # of this step's gradients, for the log

    def update(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        sq = torch.linalg.vector_norm(p.grad.detach()).double().square()  # a reduction: no gradient-sized temporary
        self.norm_sq = self.norm_sq.to(sq.device) + sq
        if bool(torch.isfinite(sq)):  # a non-finite gradient must not reach AdamW's moments
            # Narrow every group to this one parameter for a moment: AdamW steps only what it lists.
            everyone = [group["params"] for group in self.groups]
            for group in self.groups:
                group["params"] = [p] if group is self.home[p] else []
            try:
                self.optimizer.step()
            finally:
                for group, params in zip(self.groups, everyone):
                    group["params"] = params
        p.grad = None

    def arm(self, finite_loss: bool) -> None:
        """Called before a step's last backward: update during it only if the loss is finite."""
        self.finite = finite_loss
        # AdamW allocates a parameter's moments at its first update: inside backward they would
        # pile up on top of the live activations. So the first update runs after backward.
        self.armed = finite_loss and len(self.optimizer.state) == len(self.home)
        self.norm_sq = torch.zeros((), dtype=torch.float64)

    def finish(self) -> torch.Tensor:
        """After the step's backward: the first update, one parameter at a time (each gradient
        freed as its moments are allocated); returns the step's gradient norm."""
        if self.finite and not self.armed:
            self.armed = True
            for p in self.home:
                if p.grad is not None:
                    self.update(p)
        self.armed = False
        return self.norm_sq.sqrt()


# --- evaluation loss (used during training and by evaluate.py) ---------------------------

@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, pad_id: int, device: torch.device,
              bf16: bool = False, loss_fn: LossFn = causal_lm_loss, max_tokens: int | None = None) -> tuple[float, int]:
    """Token-weighted mean loss over examples, streamed batch by batch (no logits are kept)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for idx in length_batches(examples, batch_size, max_tokens):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with autocast(device, bf16):
            loss_sum, n = distributed.call(model, loss_fn, batch)
        total += loss_sum.double()
        count += n
    model.train(was_training)
    n_tokens = int(count.item())
    return (total.item() / n_tokens if n_tokens else float("nan")), n_tokens


def accumulate_gradients(model, batches: list[dict], loss_fn: LossFn, device: torch.device,
                         bf16: bool, before_last_backward: Callable[[bool], None] | None = None
                         ) -> tuple[torch.Tensor, int]:
    """Backward over a step's micro-batches; returns (this process's summed loss, label tokens of
    the step across all processes).

    Each micro-batch's summed loss is divided by the label tokens of the *whole step*, not its
    own: a micro-batch with few response tokens must not weigh as much as one with many, and
    the gradient is then the same however the step is split, over micro-batches or processes.
    `before_last_backward(finite)` is told, before the step's last backward, whether the step's
    loss is finite (optimizer_in_backward updates during that backward, or not at all).
    """
    step_tokens = distributed.all_reduce_sum(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches))
    # DDP and FSDP *average* gradients over processes; we want their *sum* (each process holds
    # part of one step's tokens), so each process scales its loss by the world size. Exact for
    # a power-of-two world; on one process it is a multiplication by 1.
    world = distributed.world_size()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with distributed.gradient_sync(model, enabled=i == len(batches) - 1):  # sync once per step
            with autocast(device, bf16):
                loss_sum, _ = distributed.call(model, loss_fn, batch)
            total += loss_sum.detach().double()
            if before_last_backward is not None and i == len(batches) - 1:
                before_last_backward(bool(torch.isfinite(total)))
            (loss_sum * world / max(step_tokens, 1)).backward()
    return total, step_tokens


# --- logging ---------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (one object per logged event) plus TensorBoard scalars."""

    def __init__(self, out_dir: Path, purge_step: int | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard hides what the killed run logged after the checkpoint.
        self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


@dataclass
class FitResult:
    steps: int = 0
    epochs: float = 0.0
    train_loss: float = float("nan")
    best_eval_loss: float | None = None
    stopped_early: bool = False
    wall_seconds: float = 0.0
    trained_tokens: int = 0  # label tokens the loss was taken on
    seen_tokens: int = 0  # real (non-padding) tokens fed forward
    tokens_per_second: float = 0.0  # seen tokens per second of the whole fit
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0  # updates skipped because the loss or gradient norm was not finite


def _progress(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    import sys

    return Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    disable=not sys.stderr.isatty(), transient=False)


# --- the loop --------------------------------------------------------------------------------

def fit(model, tokenizer, train: list[Example], val: list[Example], cfg: RunConfig, out_dir: Path,
        log: MetricsLog, device: torch.device, loss_fn: LossFn = causal_lm_loss,
        resume: Path | None = None) -> FitResult:
    if cfg.optimizer_in_backward and distributed.world_size() > 1:
        raise UserError("optimizer_in_backward: true works on one process only (DDP and FSDP reduce gradients "
                        "after backward, the in-backward update would use this process's part); turn it off "
                        "under torchrun / --nproc")
    torch.manual_seed(cfg.seed)
    bf16 = resolve_bf16(cfg.bf16, device)
    pad_id = tokenizer.pad_token_id
    packing = cfg.packing and cfg.task != "classification"  # a classifier pools one token per row: no packing
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * distributed.world_size()
    steps_per_epoch = math.ceil(len(train) / per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.num_train_epochs))
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    eval_every = cfg.eval_steps or steps_per_epoch

    prepare_for_training(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, total_steps))
    fingerprint = data_fingerprint(train)

    result = FitResult()
    best_state, bad_evals, nonfinite_in_a_row = None, 0, 0
    window_loss = torch.zeros((), device=device, dtype=torch.float64)  # summed over the logging window
    window_tokens = torch.zeros((), device=device, dtype=torch.long)
    window_seen = 0  # real (non-padding) tokens fed forward, for tokens/s
    epoch, groups, first_step = 0, [], 1
    if resume is None:
        log.write({"step": 0, "event": "start", "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                   "warmup_steps": warmup, "bf16": bf16, "world_size": distributed.world_size(),
                   "train_examples": len(train), "val_examples": len(val),
                   "trainable_parameters": sum(p.numel() for p in params),
                   "total_parameters": sum(p.numel() for p in model.parameters())})
    else:  # continue exactly where the checkpoint was taken: weights, optimizer, RNGs, data order, windows
        state, best_state = dist_checkpoint.load(resume, model, optimizer, scheduler)  # every rank its part
        if state["data"] != fingerprint:
            raise UserError(f"{resume}: the training data (or its tokenisation) differs from the run's; "
                            "resuming would not continue the same run (restore the data, or start a new output_dir)")
        epoch, groups, bad_evals = state["epoch"], state["groups"], state["bad_evals"]
        nonfinite_in_a_row, first_step = state["nonfinite_in_a_row"], state["step"] + 1
        window_loss.fill_(state["window_loss"]); window_tokens.fill_(state["window_tokens"])
        window_seen = state["window_seen"]
        result = FitResult(**state["result"])
        log.write({"step": state["step"], "event": "resume", "checkpoint": str(resume)})
        print(f"resuming from {resume} at step {first_step}", flush=True)
    start = window_start = time.perf_counter()
    model.train()
    trimmed_blocks = find_blocks(without_adapters(distributed.unwrap(model)))[1] if cfg.cpu_heap_trim else None
    with _progress(total_steps) as bar, stop_on_signals() as stop, \
            optimizer_steps_in_backward(optimizer, cfg.optimizer_in_backward) as in_backward, \
            host_memory.heap_trimmed_between_blocks(trimmed_blocks):
        task = bar.add_task("train", total=total_steps, info="", completed=first_step - 1)
        for step in range(first_step, total_steps + 1):
            if not groups:  # next epoch: a fresh seeded shuffle
                groups = step_groups(len(train), per_step, cfg.seed, epoch)
                epoch += 1
            group = groups.pop(0)  # the same global step on every process; each takes its share
            distributed.inject_fault(step)
            if packing:
                batches = [collate_packed([[train[i] for i in row] for row in mb], pad_id)
                           for mb in packed_micro_batches(group, train, cfg.per_device_train_batch_size)]
            else:
                batches = [collate([train[i] for i in mb], pad_id)
                           for mb in micro_batches(group, train, cfg.per_device_train_batch_size,
                                                   cfg.max_tokens_per_batch)]
            step_loss, step_tokens = accumulate_gradients(model, distributed.local_share(batches), loss_fn, device, bf16,
                                                          in_backward.arm if in_backward else None)
            seen = sum(len(train[i].input_ids) for i in group)  # the whole step's, counted on the host: no sync
            window_seen += seen
            result.seen_tokens += seen
            if in_backward:  # AdamW ran parameter by parameter during backward (after it, the first time)
                grad_norm = in_backward.finish()
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if bool(torch.isfinite(step_loss + grad_norm)):
                if not in_backward:
                    optimizer.step()
                window_loss += step_loss
                window_tokens += step_tokens
                result.trained_tokens += step_tokens
                nonfinite_in_a_row = 0
            else:  # skip the update: one bad batch must not turn every weight into NaN
                nonfinite_in_a_row += 1
                result.skipped_steps += 1
                log.write({"step": step, "event": "nonfinite_skipped", "in_a_row": nonfinite_in_a_row})
                print(f"step {step}: loss or gradient norm is not finite; update skipped"
                      + (" for the parameters whose gradient was not finite (optimizer_in_backward had "
                         "updated the others)" if in_backward and in_backward.finite else ""), flush=True)
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    last = latest_checkpoint(out_dir)
                    raise UserError(
                        f"step {step}: loss or gradient norm not finite for {nonfinite_in_a_row} steps in a row "
                        f"(max_nonfinite_steps={cfg.max_nonfinite_steps}); likely causes: learning_rate "
                        f"{cfg.learning_rate:g} too high, or broken records/weights (check the data, lower "
                        f"learning_rate); final/ not written, last good checkpoint: {last or 'none'}")
            scheduler.step()  # the schedule follows the step count, skipped steps included
            optimizer.zero_grad(set_to_none=True)

            if (step % cfg.logging_steps == 0 or step == total_steps) and int(window_tokens) > 0:
                now = time.perf_counter()
                loss = (distributed.all_reduce_sum(window_loss) / window_tokens.clamp(min=1)).item()
                record = {"step": step, "epoch": round(epoch - 1 + (steps_per_epoch - len(groups)) / steps_per_epoch, 4),
                          "loss": loss, "learning_rate": scheduler.get_last_lr()[0], "grad_norm": distributed.scalar(grad_norm),
                          "tokens_per_second": window_seen / max(now - window_start, 1e-9),
                          "elapsed_seconds": now - start}
                log.write(record)
                result.history.append(record)
                result.train_loss = loss
                bar.update(task, info=f"loss {loss:.4f} lr {record['learning_rate']:.2e} "
                                      f"{record['tokens_per_second']:.0f} tok/s")
                if not bar.live.is_started:  # no terminal: one plain line per log
                    print(f"step {step}/{total_steps} loss {loss:.4f} lr {record['learning_rate']:.2e} "
                          f"{record['tokens_per_second']:.0f} tok/s", flush=True)
                window_loss.zero_(); window_tokens.zero_(); window_seen = 0; window_start = now

            if val and (step % eval_every == 0 or step == total_steps):
                eval_loss, _ = mean_loss(model, val, cfg.per_device_eval_batch_size, pad_id, device, bf16, loss_fn,
                                         cfg.max_tokens_per_batch)
                log.write({"step": step, "eval_loss": eval_loss})
                result.history.append({"step": step, "eval_loss": eval_loss})
                if result.best_eval_loss is None or eval_loss < result.best_eval_loss:
                    result.best_eval_loss, bad_evals = eval_loss, 0
                    if cfg.early_stopping_patience:
                        best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                else:
                    bad_evals += 1
                    if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                        result.stopped_early = True
                        log.write({"step": step, "event": "early_stop", "best_eval_loss": result.best_eval_loss})
                        bar.update(task, completed=step)
                        result.steps = step
                        break

            bar.update(task, completed=step)
            result.steps = step
            crash_point("step", step)
            due = cfg.save_steps and step % cfg.save_steps == 0 and step != total_steps
            signum = dist_checkpoint.agreed_stop_signal(stop.signum)  # under torchrun: one rank's signal stops all
            if signum or due:
                loop = {"step": step, "epoch": epoch, "groups": groups, "bad_evals": bad_evals,
                        "nonfinite_in_a_row": nonfinite_in_a_row, "window_loss": window_loss.item(),
                        "window_tokens": int(window_tokens), "window_seen": window_seen,
                        "data": fingerprint, "result": asdict(result)}
                saved = dist_checkpoint.save(out_dir, step, cfg, model, optimizer, scheduler, loop, best_state, log.path)
                if signum:
                    raise StopRequested(signum, step, saved)

    if best_state is not None:  # early stopping keeps the weights of the best evaluation
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in best_state:
                    p.copy_(best_state[name])
    result.epochs = result.steps / steps_per_epoch
    result.wall_seconds = time.perf_counter() - start
    result.tokens_per_second = result.seen_tokens / max(result.wall_seconds, 1e-9)
    model.eval()
    return result
