"""The training loop: one explicit function, `fit`, readable in a single pass.

θ ← θ − η·∇θ L: AdamW over the trainable parameters, the loss normalised by the number of
label tokens in the whole optimizer step (so gradient accumulation changes nothing but memory),
warm-up then linear/cosine/constant decay, gradient clipping, periodic logging, evaluation,
early stopping and checkpoints. One host sync per step decides whether the update is finite
(a non-finite loss or gradient norm skips the update instead of poisoning AdamW's moments);
other syncs (`.item()`) happen only when something is logged.

Everything the loop carries from one step to the next is one `LoopState`: a checkpoint saves
`state.as_dict()`, a resume restores `LoopState.from_dict(...)`, nowhere else. Checkpoints and
exact resume live in checkpoint.py / dist_checkpoint.py.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from deltatune.data.batching import (
    collate,
    collate_packed,
    micro_batches,
    packed_micro_batches,
    real_tokens,
    step_groups,
)
from deltatune.data.examples import Example
from deltatune.data.stream import ExampleStream
from deltatune.errors import UserError
from deltatune.evaluate.loss import LossFn, causal_lm_loss, label_tokens, mean_loss
from deltatune.runtime import distributed
from deltatune.runtime.faults import crash_point, inject_fault
from deltatune.runtime.precision import autocast, resolve_bf16
from deltatune.train import dist_checkpoint
from deltatune.train.checkpoint import StopRequested, data_fingerprint, latest_checkpoint, stop_on_signals
from deltatune.train.optim import build_optimizer, lr_lambda, optimizer_steps_in_backward


@dataclass
class FitResult:
    steps: int = 0
    epochs: float = 0.0
    train_loss: float = float("nan")
    best_eval_loss: float | None = None
    stopped_early: bool = False
    wall_seconds: float = 0.0
    trained_tokens: int = 0  # units the loss was taken on: label tokens (pairs, for a preference loss)
    seen_tokens: int = 0  # real (non-padding) tokens fed forward
    tokens_per_second: float = 0.0  # seen tokens per second of the whole fit
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0  # updates skipped because the loss or gradient norm was not finite


@dataclass(frozen=True)
class FitRun:
    """What `fit` needs besides the hyperparameters: where it writes, what it computes, what it resumes."""

    out_dir: Path
    log: object  # MetricsLog, or NullLog on ranks other than 0
    device: torch.device
    seed: int
    loss_fn: LossFn = causal_lm_loss
    units: Callable[[dict], int] = label_tokens  # what the loss is a sum over, counted in a batch: tokens, pairs
    packs: bool = True  # the task's examples may share a row (a classifier pools one token per row: no)
    eval_batch_size: int = 8
    keep_checkpoints: int | None = None  # save_total_limit
    config: dict = field(default_factory=dict)  # the flat config, stored in checkpoints (resume compares it)
    resume: Path | None = None


@dataclass(frozen=True)
class Schedule:
    """How many steps, and when warm-up ends and evaluations come, from the data size and TrainArgs."""

    per_step: int
    steps_per_epoch: int
    total: int
    warmup: int
    eval_every: int

    @classmethod
    def of(cls, n_examples: int, args, world: int) -> "Schedule":
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        steps_per_epoch = math.ceil(n_examples / per_step)
        total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(steps_per_epoch * args.num_train_epochs))
        warmup = args.warmup_steps or int(args.warmup_ratio * total)
        return cls(per_step, steps_per_epoch, total, warmup, args.eval_steps or steps_per_epoch)


class Window:
    """The logging window: loss, its units (label tokens, pairs) and the loss's own statistics
    summed on the device (no host sync per step), real tokens fed forward counted on the host,
    and when the window opened."""

    def __init__(self, device: torch.device, loss: float = 0.0, tokens: int = 0, seen: int = 0,
                 stats: dict[str, float] | None = None):
        self.device = device
        self.loss = torch.full((), loss, dtype=torch.float64, device=device)
        self.tokens = torch.full((), tokens, dtype=torch.long, device=device)
        self.stats = {k: torch.full((), v, dtype=torch.float64, device=device) for k, v in (stats or {}).items()}
        self.seen = seen
        self.opened = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int, stats: dict[str, torch.Tensor]) -> None:
        self.loss += loss
        self.tokens += tokens
        for name, value in stats.items():
            self.stats.setdefault(name, torch.zeros((), dtype=torch.float64, device=self.device)).add_(value)

    def reset(self, now: float) -> None:
        self.loss.zero_()
        self.tokens.zero_()
        for value in self.stats.values():
            value.zero_()
        self.seen, self.opened = 0, now


@dataclass
class LoopState:
    """Everything the loop carries from step to step; `as_dict` is what a checkpoint stores."""

    window: Window
    step: int = 0  # the last step taken
    epoch: int = 0  # epochs begun
    groups: list[list[int]] = field(default_factory=list)  # the steps left in this epoch
    bad_evals: int = 0
    nonfinite_in_a_row: int = 0
    result: FitResult = field(default_factory=FitResult)
    best: dict | None = None  # early stopping: the best evaluation's trainable weights (saved as tensors)

    def next_group(self, schedule: Schedule, n_examples: int, seed: int, shuffle: bool = True) -> list[int]:
        """The next step's example indices: the same global step on every process."""
        if not self.groups:  # next epoch: a fresh seeded shuffle (a stream comes in its own seeded order)
            self.groups = step_groups(n_examples, schedule.per_step, seed, self.epoch, shuffle)
            self.epoch += 1
        return self.groups.pop(0)

    def epoch_progress(self, schedule: Schedule) -> float:
        return round(self.epoch - 1 + (schedule.steps_per_epoch - len(self.groups)) / schedule.steps_per_epoch, 4)

    def as_dict(self, fingerprint: str) -> dict:
        return {"step": self.step, "epoch": self.epoch, "groups": self.groups, "bad_evals": self.bad_evals,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "window_loss": self.window.loss.item(),
                "window_tokens": int(self.window.tokens), "window_seen": self.window.seen,
                "window_stats": {k: v.item() for k, v in self.window.stats.items()},
                "data": fingerprint, "result": asdict(self.result)}

    @classmethod
    def from_dict(cls, state: dict, best: dict | None, device: torch.device) -> "LoopState":
        window = Window(device, state["window_loss"], state["window_tokens"], state["window_seen"],
                        state.get("window_stats"))
        return cls(window, state["step"], state["epoch"], state["groups"], state["bad_evals"],
                   state["nonfinite_in_a_row"], FitResult(**state["result"]), best)


def prepare_for_training(model, memory) -> None:
    """The model-level switches of MemoryArgs (`gradient_checkpointing`, `torch_compile`)."""
    if memory.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and keyword arguments. The name every transformers 5
        # release has (5.24 also calls it activation_checkpointing_enable).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if memory.torch_compile and not getattr(model.get_decoder(), "_compiled_call_impl", None):
        # Packed batches change shape every step: dynamic shapes avoid one recompile per shape.
        model.get_decoder().compile(dynamic=True)


def step_batches(group: list[int], examples: list[Example], batch_size: int, max_tokens: int | None,
                 packed: bool, pad_id: int) -> list[dict]:
    """One optimizer step's micro-batches, packed rows or padded batches of similar length."""
    if packed:
        return [collate_packed([[examples[i] for i in row] for row in mb], pad_id)
                for mb in packed_micro_batches(group, examples, batch_size)]
    return [collate([examples[i] for i in mb], pad_id) for mb in micro_batches(group, examples, batch_size, max_tokens)]


def accumulate_gradients(model, batches: list[dict], loss_fn: LossFn, device: torch.device,
                         bf16: bool, before_last_backward: Callable[[bool], None] | None = None,
                         units: Callable[[dict], int] = label_tokens) -> tuple[torch.Tensor, int, dict]:
    """Backward over a step's micro-batches; returns (this process's summed loss, the step's units
    across all processes, this process's sums of the loss's own statistics).

    Each micro-batch's summed loss is divided by the units (label tokens; pairs for a preference
    loss) of the *whole step*, not its own: a micro-batch with few response tokens must not weigh
    as much as one with many, and the gradient is then the same however the step is split, over
    micro-batches or processes. `before_last_backward(finite)` is told, before the step's last
    backward, whether the step's loss is finite (optimizer_in_backward updates during that
    backward, or not at all).
    """
    step_tokens = distributed.all_reduce_sum(sum(units(b) for b in batches))
    # DDP and FSDP *average* gradients over processes; we want their *sum* (each process holds
    # part of one step's tokens), so each process scales its loss by the world size. Exact for
    # a power-of-two world; on one process it is a multiplication by 1.
    world = distributed.world_size()
    total = torch.zeros((), dtype=torch.float64, device=device)
    stats: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with distributed.gradient_sync(model, enabled=i == len(batches) - 1):  # sync once per step
            with autocast(device, bf16):
                loss_sum, _, *extra = distributed.call(model, loss_fn, batch)
            total += loss_sum.detach().double()
            for name, value in (extra[0] if extra else {}).items():
                stats[name] = stats.get(name, 0.0) + value.detach().double()
            if before_last_backward is not None and i == len(batches) - 1:
                before_last_backward(bool(torch.isfinite(total)))
            (loss_sum * world / max(step_tokens, 1)).backward()
    return total, step_tokens, stats


def apply_update(optimizer, params: list, max_grad_norm: float, in_backward, step_loss) -> tuple[torch.Tensor, bool]:
    """Clip and step, unless the loss or the gradient norm is not finite; (gradient norm, applied).

    With optimizer_in_backward AdamW already ran parameter by parameter during backward (after
    it, the first time), so only the norm is left to read."""
    if in_backward:
        grad_norm = in_backward.finish()
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    finite = bool(torch.isfinite(step_loss + grad_norm))  # the step's one host sync
    if finite and not in_backward:
        optimizer.step()
    return grad_norm, finite


def count_nonfinite(state: LoopState, args, run: FitRun, partly_applied: bool) -> None:
    """A skipped update: logged, and after `max_nonfinite_steps` in a row the run stops."""
    state.nonfinite_in_a_row += 1
    state.result.skipped_steps += 1
    step = state.step
    run.log.write({"step": step, "event": "nonfinite_skipped", "in_a_row": state.nonfinite_in_a_row})
    print(f"step {step}: loss or gradient norm is not finite; update skipped"
          + (" for the parameters whose gradient was not finite (optimizer_in_backward had "
             "updated the others)" if partly_applied else ""), flush=True)
    if state.nonfinite_in_a_row >= args.max_nonfinite_steps:
        last = latest_checkpoint(run.out_dir)
        raise UserError(
            f"step {step}: loss or gradient norm not finite for {state.nonfinite_in_a_row} steps in a row "
            f"(max_nonfinite_steps={args.max_nonfinite_steps}); likely causes: learning_rate "
            f"{args.learning_rate:g} too high, or broken records/weights (check the data, lower "
            f"learning_rate); final/ not written, last good checkpoint: {last or 'none'}")


def log_window(state: LoopState, schedule: Schedule, lr: float, grad_norm, started: float, run: FitRun, show) -> None:
    """Write the window's mean loss (over every process's label tokens) and start a new window."""
    window, now = state.window, time.perf_counter()
    units = window.tokens.clamp(min=1)
    loss = (distributed.all_reduce_sum(window.loss) / units).item()
    means = {name: (distributed.all_reduce_sum(total) / units).item() for name, total in sorted(window.stats.items())}
    record = {"step": state.step, "epoch": state.epoch_progress(schedule), "loss": loss, **means, "learning_rate": lr,
              "grad_norm": distributed.scalar(grad_norm),
              "tokens_per_second": window.seen / max(now - window.opened, 1e-9), "elapsed_seconds": now - started}
    run.log.write(record)
    state.result.history.append(record)
    state.result.train_loss = loss
    show(state.step, f"loss {loss:.4f} lr {lr:.2e} {record['tokens_per_second']:.0f} tok/s")
    window.reset(now)


def evaluate_during_training(model, val: list[Example], state: LoopState, args, memory, run: FitRun, pad_id: int,
                             bf16: bool) -> bool:
    """Validation loss now; keeps the best weights for early stopping; True when it is time to stop."""
    eval_loss, _ = mean_loss(model, val, run.eval_batch_size, pad_id, run.device, bf16, run.loss_fn,
                             memory.max_tokens_per_batch)
    result = state.result
    run.log.write({"step": state.step, "eval_loss": eval_loss})
    result.history.append({"step": state.step, "eval_loss": eval_loss})
    if result.best_eval_loss is None or eval_loss < result.best_eval_loss:
        result.best_eval_loss, state.bad_evals = eval_loss, 0
        if args.early_stopping_patience:
            state.best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return False
    state.bad_evals += 1
    if args.early_stopping_patience and state.bad_evals >= args.early_stopping_patience:
        result.stopped_early = True
        run.log.write({"step": state.step, "event": "early_stop", "best_eval_loss": result.best_eval_loss})
        return True
    return False


def start_or_resume(run: FitRun, model, optimizer, scheduler, fingerprint: str, start_record: dict) -> LoopState:
    """A fresh state at step 0 (logging the start), or exactly the checkpoint's: weights, optimizer,
    RNGs, data order, logging window."""
    if run.resume is None:
        run.log.write(start_record)
        return LoopState(Window(run.device))
    loop, best = dist_checkpoint.load(run.resume, model, optimizer, scheduler)  # every rank its part
    if loop["data"] != fingerprint:
        raise UserError(f"{run.resume}: the training data (or its tokenisation) differs from the run's; "
                        "resuming would not continue the same run (restore the data, or start a new output_dir)")
    run.log.write({"step": loop["step"], "event": "resume", "checkpoint": str(run.resume)})
    print(f"resuming from {run.resume} at step {loop['step'] + 1}", flush=True)
    return LoopState.from_dict(loop, best, run.device)


@contextmanager
def progress(total: int, done: int):
    """A progress bar on a terminal; elsewhere one plain line per logged step (CI logs stay readable).
    Yields show(step, info=None)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), disable=not sys.stderr.isatty(), transient=False)
    with bar:
        task = bar.add_task("train", total=total, info="", completed=done)

        def show(step: int, info: str | None = None) -> None:
            if info is None:
                bar.update(task, completed=step)
                return
            bar.update(task, info=info)
            if not bar.live.is_started:
                print(f"step {step}/{total} {info}", flush=True)
        yield show


def fit(model, tokenizer, train: list[Example], val: list[Example], args, memory, run: FitRun) -> FitResult:
    """Train `model` in place on `train` (`args`: TrainArgs, `memory`: MemoryArgs); evaluate on `val`."""
    torch.manual_seed(run.seed)
    bf16 = resolve_bf16(memory.bf16, run.device)
    pad_id, world = tokenizer.pad_token_id, distributed.world_size()
    schedule = Schedule.of(len(train), args, world)
    prepare_for_training(model, memory)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, args, memory.optimizer_state_dtype, run.seed, run.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler_type, schedule.warmup,
                                                                       schedule.total))
    fingerprint = data_fingerprint(train)
    state = start_or_resume(run, model, optimizer, scheduler, fingerprint, {
        "step": 0, "event": "start", "total_steps": schedule.total, "steps_per_epoch": schedule.steps_per_epoch,
        "warmup_steps": schedule.warmup, "bf16": bf16, "world_size": world, "train_examples": len(train),
        "val_examples": len(val), "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters())})
    result, started = state.result, time.perf_counter()
    state.window.opened = started
    model.train()
    with progress(schedule.total, state.step) as show, stop_on_signals() as stop, \
            optimizer_steps_in_backward(optimizer, memory.optimizer_in_backward) as in_backward:
        for step in range(state.step + 1, schedule.total + 1):
            group = state.next_group(schedule, len(train), run.seed, shuffle=not isinstance(train, ExampleStream))
            inject_fault(step)
            batches = step_batches(group, train, args.per_device_train_batch_size, memory.max_tokens_per_batch,
                                   memory.packing and run.packs, pad_id)
            step_loss, step_tokens, step_stats = accumulate_gradients(
                model, distributed.local_share(batches), run.loss_fn, run.device, bf16,
                in_backward.arm if in_backward else None, run.units)
            seen = sum(real_tokens(train[i]) for i in group)  # the whole step's, counted on the host: no sync
            state.window.seen += seen
            result.seen_tokens += seen
            grad_norm, applied = apply_update(optimizer, params, args.max_grad_norm, in_backward, step_loss)
            state.step = result.steps = step
            if applied:
                state.window.add(step_loss, step_tokens, step_stats)
                result.trained_tokens += step_tokens
                state.nonfinite_in_a_row = 0
            else:  # skip the update: one bad batch must not turn every weight into NaN
                count_nonfinite(state, args, run, partly_applied=bool(in_backward and in_backward.finite))
            scheduler.step()  # the schedule follows the step count, skipped steps included
            optimizer.zero_grad(set_to_none=True)
            if (step % args.logging_steps == 0 or step == schedule.total) and int(state.window.tokens) > 0:
                log_window(state, schedule, scheduler.get_last_lr()[0], grad_norm, started, run, show)
            if val and (step % schedule.eval_every == 0 or step == schedule.total):
                if evaluate_during_training(model, val, state, args, memory, run, pad_id, bf16):
                    show(step)
                    break
            show(step)
            crash_point("step", step)
            due = args.save_steps and step % args.save_steps == 0 and step != schedule.total
            signum = dist_checkpoint.agreed_stop_signal(stop.signum)  # under torchrun: one rank's signal stops all
            if signum or due:
                saved = dist_checkpoint.save(run.out_dir, step, run.config, model, optimizer, scheduler,
                                             state.as_dict(fingerprint), state.best, run.log.path,
                                             keep=run.keep_checkpoints)
                if signum:
                    raise StopRequested(signum, step, saved)
    return finish(model, state, schedule, started)


def finish(model, state: LoopState, schedule: Schedule, started: float) -> FitResult:
    """Early stopping keeps the weights of the best evaluation; the totals of the whole fit."""
    if state.best is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state.best:
                    p.copy_(state.best[name])
    result = state.result
    result.epochs = result.steps / schedule.steps_per_epoch
    result.wall_seconds = time.perf_counter() - started
    result.tokens_per_second = result.seen_tokens / max(result.wall_seconds, 1e-9)
    model.eval()
    return result
