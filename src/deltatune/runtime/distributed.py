"""Many processes, one training loop: torchrun's environment turned into DDP or FSDP2.

torchrun (or `deltatune train --nproc N`, which execs it) starts one process per device and
sets RANK, WORLD_SIZE and LOCAL_RANK. `init` turns that into a process group (nccl on CUDA,
gloo on CPU) with a timeout, so a rank that crashes or hangs ends the job with an error
instead of leaving the others waiting forever. Without those variables every function here
is the identity and the code runs as one process.

DDP and FSDP hook a module's *forward*. Our loss (`causal_lm_loss`) and evaluation call
pieces of the model (decoder, output head, `generate`) rather than its forward, so the model
is wrapped in `_Shell`, whose forward is "run this function on the model". `call(model, fn,
...)` runs any such function as the forward of the wrapped model, and as a plain call on one
process, so the loop itself does not care how many processes there are.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from deltatune.data.examples import IGNORE_INDEX
from deltatune.errors import UserError
from deltatune.model.load import save_pretrained_atomic
from deltatune.model.parts import without_adapters

# --- process group -----------------------------------------------------------------------

def launched_world_size() -> int:
    """Processes torchrun started for this job (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Only rank 0 logs and writes files; the others compute and stay quiet."""
    return rank() == 0


def init(timeout_seconds: float) -> torch.device:
    """Join torchrun's process group (if any) and return this process's device."""
    world = launched_world_size()
    if not torch.cuda.is_available():
        device = torch.device("cpu")
    elif world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cuda")
    if world > 1 and not dist.is_initialized():
        # The timeout bounds every collective: a peer that died or hangs makes the others
        # raise after `timeout_seconds`, and torchrun then stops the whole job.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_seconds),
                                device_id=device if device.type == "cuda" else None)
        if not is_main():  # one copy of progress lines and reports; errors (stderr) stay visible
            sys.stdout = open(os.devnull, "w")
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- reductions ---------------------------------------------------------------------------

def comm_device() -> torch.device:
    """Where collectives exchange tensors: the GPU under nccl, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value):
    """Sum of an int, float or tensor over all processes (the value itself on one process)."""
    if not dist.is_initialized():
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().to(comm_device()).clone()
        dist.all_reduce(out)
        return out.to(value.device)
    out = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.long,
                       device=comm_device())
    dist.all_reduce(out)
    return out.item()


def all_true(flag: bool) -> bool:
    """True only if `flag` is true on every process (so every process takes the same branch)."""
    return all_reduce_sum(0 if flag else 1) == 0


def scalar(value) -> float:
    """A Python float from a number, tensor or DTensor (FSDP's gradient norm is a DTensor)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# --- wrapping -----------------------------------------------------------------------------

class _Shell(torch.nn.Module):
    """The module DDP/FSDP wrap: its forward runs `fn(model, ...)`, so any loss or evaluation
    function that calls parts of the model (not its forward) still runs inside the wrapper's
    forward, where DDP prepares gradient sync and FSDP gathers the outer parameters."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def _transformer_blocks(model) -> list[torch.nn.Module]:
    """The model's repeated blocks, found by the class names transformers keeps for sharding."""
    names = set(getattr(without_adapters(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_model(model: torch.nn.Module, parallelism: str, device: torch.device,
               cpu_offload: bool = False) -> torch.nn.Module:
    """Move the model to `device` and, under torchrun, wrap it for data parallelism.

    ddp: a full replica per process, gradients all-reduced in backward.
    fsdp: FSDP2 `fully_shard` per transformer block and once more for the rest (embeddings,
    final norm, head), so each process holds 1/world of the weights, gradients and optimizer
    state; optional CPU offload of the shards.
    """
    if world_size() == 1:
        return model.to(device)
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers off: our buffers (rotary tables) are constants, and syncing them
        # would add a collective to every forward, evaluation included.
        return DistributedDataParallel(_Shell(model.to(device)),
                                       device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    if parallelism == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        blocks = _transformer_blocks(model)
        if not blocks:
            raise UserError(f"parallelism: fsdp cannot find the transformer blocks of {type(model).__name__} "
                            "(it lists no _no_split_modules; use parallelism: ddp)")
        # fully_shard moves each shard to the mesh's device (or keeps it in CPU memory with
        # offload): the whole model never has to fit one device.
        options = {"mesh": init_device_mesh(device.type, (world_size(),))}
        if cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        for block in blocks:
            fully_shard(block, **options)
        return fully_shard(_Shell(model), **options)
    raise UserError(f"parallelism: unknown value '{parallelism}' (use ddp or fsdp)")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without the DDP / FSDP shell."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.model if isinstance(model, _Shell) else model


def call(model: torch.nn.Module, fn, *args, **kwargs):
    """`fn(model, ...)`, run as the forward of the DDP/FSDP wrapper when there is one."""
    if not isinstance(model, (_Shell, torch.nn.parallel.DistributedDataParallel)):
        return fn(model, *args, **kwargs)
    out = model(fn, *args, **kwargs)
    if hasattr(model, "reshard") and not torch.is_grad_enabled():
        # FSDP leaves the outer weights gathered after a forward, for the backward that follows;
        # an evaluation has none, and an optimizer built now would hold the gathered copies.
        model.reshard()
    return out


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Context for one micro-batch's backward: without sync, gradients only accumulate locally
    (DDP `no_sync`, FSDP2 `set_requires_gradient_sync(False)`); the step's last micro-batch syncs."""
    if enabled:
        return nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# --- data ---------------------------------------------------------------------------------

def local_share(batches: list[dict]) -> list[dict]:
    """This process's micro-batches of a global step: every world-th one, round robin.

    Every process must run the same number of forward/backward passes (FSDP gathers weights in
    each), so where a short last step has too few micro-batches, a process gets a blank one:
    real inputs whose labels are all ignored, which adds zero loss and zero gradient.
    """
    world = world_size()
    if world == 1:
        return batches
    mine = batches[rank()::world]
    per_process = -(-len(batches) // world)
    if len(mine) < per_process:
        # Two rows: a preference batch keeps a pair's chosen and rejected sides together.
        blank = {k: v[:2] for k, v in batches[-1].items()}
        blank["labels"] = torch.full_like(blank["labels"], IGNORE_INDEX)
        mine = mine + [blank] * (per_process - len(mine))
    return mine


# --- writing ------------------------------------------------------------------------------

def full_state_dict(model: torch.nn.Module) -> dict | None:
    """The unwrapped model's full state dict, gathered from the FSDP shards (collective: every
    process must call it); None for DDP and one process, where the model holds it already.
    Returns an empty dict on ranks other than 0 under FSDP."""
    inner = unwrap(model)
    if not isinstance(model, _Shell):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:
        # Gathering copies each parameter; tied weights (embeddings = output head) must stay one
        # tensor so save_pretrained writes them once, exactly as a single-process run does.
        first: dict[int, str] = {}
        for name, p in inner.named_parameters(remove_duplicate=False):
            if name in state:
                state[name] = state[first.setdefault(id(p), name)]
    return state


def save_model(model, tokenizer, out: Path) -> None:
    """Write a model folder from rank 0, in the same format as a single-process run."""
    state = full_state_dict(model)  # every rank takes part in the gather
    if is_main():
        save_pretrained_atomic(unwrap(model), tokenizer, out, state_dict=state)
    barrier()  # nobody reads or overwrites the folder before it is complete


FINITE_CHUNK = 1 << 24  # elements checked at once: isfinite's temporaries of a 128k-token table would be a GB


def all_finite(model: torch.nn.Module) -> bool:
    """Every trained weight finite on every process (each checks its own shards); a frozen weight is as loaded."""
    def finite(p) -> bool:
        flat = getattr(p, "_local_tensor", p).detach().reshape(-1)
        return all(bool(torch.isfinite(flat[i: i + FINITE_CHUNK]).all()) for i in range(0, flat.numel(), FINITE_CHUNK))
    return all_true(all(finite(p) for p in model.parameters() if p.requires_grad))


@contextmanager
def peer_failures_explained(timeout_seconds: float):
    """Turn "a collective failed" into one line that says what it means and where to look.

    When a rank dies or stops responding, the others fail inside a collective with a transport
    message (gloo: "Timed out waiting ...", "Connection closed by peer"); torchrun then stops
    the job and names the failed ranks.
    """
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if not dist.is_initialized() or not (isinstance(err, dist.DistError) or "Timed out" in text
                                             or "Connection closed by peer" in text):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise UserError(f"rank {rank()}: another process crashed or did not answer within ddp_timeout="
                        f"{timeout_seconds:g}s, so this one stopped too ({first}); the failing rank's own error "
                        "is printed above") from err


def launcher() -> list[str]:
    """How this run was started, for the command that continues it (which needs as many processes)."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world == 1:
        return ["deltatune", "train"]
    if world == local:  # one machine: what --nproc runs
        return ["deltatune", "train", "--nproc", str(world)]
    return ["torchrun", "...", "-m", "deltatune", "train"]  # several machines: the user's own torchrun line


def exec_torchrun(nproc: int, deltatune_args: list[str]) -> None:
    """Replace this process with torchrun starting `nproc` copies of `python -m deltatune ARGS`."""
    if "LOCAL_RANK" in os.environ:
        raise UserError("--nproc: already running under torchrun (drop --nproc, or launch without torchrun)")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "deltatune", *deltatune_args]
    sys.stdout.flush()
    os.execv(sys.executable, command)
