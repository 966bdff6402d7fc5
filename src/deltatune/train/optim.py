"""The optimizer: AdamW and its learning-rate schedule, AdamW run inside backward
(`optimizer_in_backward`), and AdamW with its moments stored in bfloat16
(`optimizer_state_dtype: bfloat16`).

The bfloat16 moments:

AdamW keeps two moments per trainable parameter, 8 bytes in float32: for full fine-tuning that
is twice the weights, the largest single item of the job's memory. Stored in bfloat16 they take
4 bytes. Only the storage changes: each step upcasts a chunk of the moments to float32, runs
PyTorch's own fused AdamW on it (so the update itself is AdamW's, computed in float32), and
writes the chunk back.

Writing back needs care. With β2 = 0.999 the second moment changes by about 0.1% a step, less
than half of bfloat16's spacing (2^-8 relative): round-to-nearest would drop the change, and the
moment would stop following the gradients (under a constant gradient of 1 it freezes at 0.25
while the true value climbs to 0.86 in 2000 steps; tests/train/test_optim.py shows it). So the
write-back rounds *stochastically*: up with probability equal to the fraction of the spacing
the value has passed, which is exact in expectation. The random bits come from a fixed table read at an offset drawn
from (seed, parameter, step, chunk): no random numbers are generated per step (that alone cost
more than the whole update), and a resumed run draws the same offsets as an uninterrupted one.

The first step of every parameter equals float32 AdamW's bit for bit (its moments start at
zero, exactly representable); later steps differ by the moments' rounding.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.optim.adamw import adamw

from deltatune.errors import UserError

CHUNK = 1 << 20  # elements upcast at a time: 8 MB of float32 scratch for the two moments
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 64-bit hash of small integers (splitmix64's finaliser, applied in turn): offsets that
    look random but are a pure function of their inputs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h


def round_stochastically_(dst: torch.Tensor, src: torch.Tensor, noise: torch.Tensor) -> None:
    """dst (bfloat16) <- src (float32) rounded up or down at random, exact in expectation.

    bfloat16 is float32's upper 16 bits. Adding a uniform 16-bit integer to the lower bits and
    then dropping them carries into the upper bits with probability lower/2^16; the float
    layout is sign-magnitude, so this rounds the magnitude for either sign. `src` is clobbered.
    """
    bits = src.view(torch.int32)
    bits.add_(noise).bitwise_and_(-65536)  # -65536 == 0xFFFF0000: keep the upper 16 bits
    dst.copy_(src)  # exact: the value now has no bits below bfloat16's precision


class AdamWBf16Moments(torch.optim.Optimizer):
    """torch.optim.AdamW's update with exp_avg and exp_avg_sq stored in bfloat16.

    The state dict has AdamW's keys (step, exp_avg, exp_avg_sq), so checkpoints and
    `optimizer_in_backward` treat it as AdamW. Parameters must be contiguous (model weights are).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        # Each parameter's place in the optimizer, for its noise offsets: fixed at construction, the
        # same in a resumed run, and unaffected when optimizer_in_backward narrows the groups.
        self._index = {p: i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        self._scratch: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._scratch:
            generator = torch.Generator().manual_seed(self.seed)
            # Twice a chunk, so any offset in [0, CHUNK) leaves a whole chunk of noise after it.
            noise = torch.randint(0, 1 << 16, (2 * CHUNK,), dtype=torch.int32, generator=generator)
            self._scratch[device] = (noise.to(device), torch.empty(CHUNK, device=device),
                                     torch.empty(CHUNK, device=device))
        return self._scratch[device]

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim casts loaded moments to the parameter's dtype (float32); put them back in
        # bfloat16, exactly (they were bfloat16 values when saved).
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AdamWBf16Moments.step takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.is_contiguous() or not p.grad.is_contiguous() or p.dtype != torch.float32:
                    raise ValueError("AdamWBf16Moments needs contiguous float32 parameters and gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                self._update(p, state, group)
        return None

    def _update(self, p: torch.Tensor, state: dict, group: dict) -> None:
        noise, m32_buf, v32_buf = self._buffers(p.device)
        beta1, beta2 = group["betas"]
        step = int(state["step"].item())  # steps taken before this one
        flat_p, flat_g = p.detach().view(-1), p.grad.detach().view(-1)
        flat_m, flat_v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        for chunk, start in enumerate(range(0, flat_p.numel(), CHUNK)):
            end = min(start + CHUNK, flat_p.numel())
            m32, v32 = m32_buf[: end - start], v32_buf[: end - start]
            m32.copy_(flat_m[start:end])
            v32.copy_(flat_v[start:end])
            # The fused kernel adds one to the step it is given before using it.
            adamw(
                [flat_p[start:end]], [flat_g[start:end]], [m32], [v32], [],
                [torch.tensor(float(step), device=p.device)],
                fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            for which, (dst, src) in enumerate(((flat_m, m32), (flat_v, v32))):
                offset = _mix(self.seed, self._index[p], step, chunk, which) % CHUNK
                round_stochastically_(dst[start:end], src, noise[offset: offset + end - start])
        state["step"] = state["step"] + 1  # a new tensor: a loaded state dict may share the old one


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


def build_optimizer(model: torch.nn.Module, args, state_dtype: str, seed: int,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (`args`: TrainArgs); `state_dtype` of its moments."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Biases and norm gains are not weights to shrink towards zero.
            (no_decay if p.ndim < 2 else decay).append(p)
    if not decay and not no_decay:
        raise UserError("no parameter is trainable (check method / freeze settings)")
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if state_dtype == "bfloat16":  # half the moments' memory, same update rule
        return AdamWBf16Moments(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8, seed=seed)
    # Fused AdamW (one kernel per tensor, also on CPU): measured several times faster than foreach on this
    # 2-core CPU over SmolLM2-sized parameters, same update to float rounding.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused, foreach=None if fused else True)


@contextmanager
def optimizer_steps_in_backward(optimizer: torch.optim.Optimizer, enabled: bool):
    """With `optimizer_in_backward`, update each parameter the moment its gradient is complete
    and free that gradient at once: a full model's gradients never exist together, which saves
    their memory (4 bytes a parameter in float32). Yields None when disabled.

    The update is AdamW's own (`optimizer.step()` on one parameter at a time), so it equals the
    ordinary step bit for bit; what cannot exist is a *global* gradient norm before the update,
    hence no clipping (the config refuses max_grad_norm > 0 with it). Only the last micro-batch's
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
