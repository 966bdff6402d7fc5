"""Checkpoints and exact resume under several processes (torchrun): DDP and FSDP.

One process: checkpoint.py as it is. DDP: every process holds the same weights and AdamW
state, so rank 0 writes exactly what one process writes, plus what differs per rank: each
rank's torch/CUDA RNG state and its part of the logging window's loss, gathered to rank 0
first. FSDP: each process holds 1/world of the weights and AdamW moments, and gathering them
on one process is what FSDP exists to avoid; so every rank writes its own shards with
`torch.distributed.checkpoint` (DCP) into the checkpoint's temporary folder, rank 0 adds the
rest (state.json, RNGs, the metrics copy) and seals the folder with the manifest, as one
process does. The folder is renamed into place only after every rank's shard is on disk.

No pickle. DCP's default FileSystemWriter stores its index as a pickled `.metadata` file that
its reader unpickles. DCP's HuggingFaceStorageWriter (save_distributed=True) writes each
rank's shards as safetensors with their offsets in the safetensors header (JSON), and
HuggingFaceStorageReader rebuilds the index from those headers: no file is unpickled. It
stores tensors only, so AdamW's param_groups (numbers) go to state.json, and the tensors that
are not sharded (AdamW's step count) to `replicated.safetensors`, written by rank 0.
(DCP still exchanges its save/load *plans* between the ranks as pickled objects in memory;
nothing pickled is read from disk.)

Resuming needs the world size the checkpoint was written with (checked in
find_resume_checkpoint): each rank's share of every step, its RNG and its shard depend on it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from deltatune.errors import UserError
from deltatune.files import writing
from deltatune.runtime import distributed
from deltatune.train.checkpoint import (
    PREFIX,
    load_checkpoint,
    restore_rng,
    resume_hint,
    rng_tensors,
    run_state,
    save_checkpoint,
    write_and_seal,
)

REPLICATED = "replicated.safetensors"


def sharded(model) -> bool:
    """FSDP: the weights are DTensor shards, one slice per process."""
    return distributed.world_size() > 1 and any(hasattr(p, "_local_tensor") for p in model.parameters())


# --- what differs per rank -------------------------------------------------------------------

def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of `tensor` (same shape and dtype everywhere), on the CPU."""
    local = tensor.to(distributed.comm_device())
    parts = [torch.empty_like(local) for _ in range(distributed.world_size())]
    dist.all_gather(parts, local)
    return [p.cpu() for p in parts]


def gathered_rng() -> dict[str, torch.Tensor]:
    """Every rank's torch/CUDA generator states as `rankN.KEY` (collective)."""
    out = {}
    for key, state in sorted(rng_tensors().items()):  # the same keys on every rank
        out.update({f"rank{r}.{key}": s for r, s in enumerate(_gather(state))})
    return out


def agreed_stop_signal(signum: int | None) -> int | None:
    """The signal that stops the run, the same on every process: a SIGTERM that reached one rank
    stops all of them after the same step, so they write one checkpoint together."""
    if distributed.world_size() == 1:
        return signum
    flag = torch.tensor(signum or 0, device=distributed.comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) or None


# --- save ------------------------------------------------------------------------------------

def save(out_dir: Path, step: int, config: dict, model, optimizer, scheduler, loop: dict, best_state: dict | None,
         metrics_path: Path | None, keep: int | None = None) -> Path | None:
    """Write `checkpoint-STEP` (collective under torchrun: every rank calls it); None if not written.

    `config`: the flat config; `keep`: checkpoints to keep (save_total_limit)."""
    if distributed.world_size() == 1:
        return save_checkpoint(out_dir, step, config, model, optimizer, scheduler, loop, best_state, metrics_path,
                               keep=keep)
    rng = gathered_rng()
    # Each rank sums its own micro-batches' loss until the next log (which adds them up).
    window = torch.tensor(loop["window_loss"], dtype=torch.float64)
    loop = {**loop, "window_loss_by_rank": [float(t) for t in _gather(window)]}
    if sharded(model):
        return _save_sharded(out_dir, step, config, model, optimizer, scheduler, loop, best_state, metrics_path, rng,
                             keep)
    saved = None
    if distributed.is_main():  # DDP: rank 0's replica is everyone's
        saved = save_checkpoint(out_dir, step, config, distributed.unwrap(model), optimizer, scheduler, loop,
                                best_state, metrics_path, rng=rng, keep=keep)
    # Also the barrier: no rank goes on (or stops) before the checkpoint is in place.
    written = distributed.all_reduce_sum(1 if saved else 0) > 0
    return out_dir / f"{PREFIX}{step}" if written else None


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Only what trains (LoRA: the adapters), as one process stores. strict=False because the
    # frozen weights are then missing on load; the trainable ones are all requested from DCP,
    # which fails on any that the checkpoint lacks.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _without_aliases(state: dict) -> dict:
    """Tied weights (input embeddings = output head, as in SmolLM2) are one tensor under two names:
    keep the first name only (safetensors refuses to store shared memory twice). Loading it fills
    the other name too, which is the same memory."""
    seen, kept = set(), {}
    for name, value in state.items():
        local = getattr(value, "_local_tensor", value)
        where = (local.data_ptr(), tuple(local.shape)) if local.numel() else None
        if where is not None and where in seen:
            continue
        seen.add(where)
        kept[name] = value
    return kept


def _flat(model_state: dict, optim_state: dict, best_state: dict | None) -> dict[str, torch.Tensor]:
    """One flat name -> tensor dict (the tensors themselves, so loading into it fills the state dicts)."""
    flat = {f"model/{k}": v for k, v in _without_aliases(model_state).items()}
    flat.update({f"optim/{fqn}/{k}": v for fqn, s in optim_state["state"].items() for k, v in s.items()})
    flat.update({f"best/{k}": v for k, v in (best_state or {}).items()})
    return flat


def _split(flat: dict) -> tuple[dict, dict]:
    """(DTensor shards for DCP, plain tensors for rank 0's file); anything else has no place."""
    shards = {k: v for k, v in flat.items() if hasattr(v, "_local_tensor")}
    plain = {k: v for k, v in flat.items() if k not in shards}
    bad = [k for k, v in plain.items() if not torch.is_tensor(v)]
    if bad:
        raise UserError(f"checkpoint: cannot store {bad[0]} (not a tensor) in a sharded checkpoint")
    return shards, plain


def _save_sharded(out_dir, step, config, model, optimizer, scheduler, loop, best_state, metrics_path, rng,
                  keep) -> Path | None:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if not distributed.all_finite(model):
        print(f"step {step}: weights are not finite; no checkpoint written (the last good one is kept)", flush=True)
        return None
    target = out_dir / f"{PREFIX}{step}"
    tmp = out_dir / f".{target.name}.tmp-sharded"  # one name every rank knows; a resume deletes leftovers
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options())
    shards, plain = _split(_flat(model_state, optim_state, best_state))
    # Each rank writes shard-0000R-model-00001-of-00001.safetensors; dcp_save returns on every
    # rank only once all of them have written (their results are gathered on rank 0).
    dcp_save(shards, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    if distributed.is_main():
        state = run_state(step, config, loop, scheduler, {"param_groups": optim_state["param_groups"]})
        state["has_best"] = best_state is not None
        with writing(target.name, out_dir, hint=resume_hint(out_dir)):
            write_and_seal(tmp, target, out_dir, step, state=state, rng=rng, metrics_path=metrics_path, keep=keep,
                           tensors={REPLICATED: {k: v.detach().contiguous().cpu() for k, v in plain.items()}})
    distributed.barrier()
    return target


# --- load ------------------------------------------------------------------------------------

def load(ckpt: Path, model, optimizer, scheduler) -> tuple[dict, dict | None]:
    """Restore a checkpoint into this process (every rank calls it); (loop state, early-stopping best)."""
    if sharded(model):
        loop, best = _load_sharded(ckpt, model, optimizer, scheduler)
    else:
        loop, best = load_checkpoint(ckpt, distributed.unwrap(model), optimizer, scheduler)
    if "window_loss_by_rank" in loop:
        loop["window_loss"] = loop["window_loss_by_rank"][distributed.rank()]
    return loop, best


def _load_sharded(ckpt: Path, model, optimizer, scheduler) -> tuple[dict, dict | None]:
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    # The state dicts to load into: this rank's shards of the weights and of AdamW's moments
    # (get_state_dict first creates the moments, by an AdamW step at learning rate 0).
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options())
    best = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            if state.get("has_best") else None)
    shards, plain = _split(_flat(model_state, optim_state, best))
    try:
        dcp_load(shards, storage_reader=HuggingFaceStorageReader(str(ckpt)))
    except CheckpointException as err:
        raise UserError(f"{ckpt}: its shards do not match this model's trainable parameters "
                        f"(was the run started with another model or method?): {str(err).splitlines()[0]}") from err
    saved = load_file(ckpt / REPLICATED)
    if set(saved) != set(plain):
        raise UserError(f"{ckpt}: {REPLICATED} does not match this model and optimizer "
                        "(was the run started with another model or method?)")
    with torch.no_grad():
        for key, tensor in saved.items():
            plain[key].copy_(tensor)
    optim_state["param_groups"] = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g
                                   for g in state["optimizer"]["param_groups"]]
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=_state_dict_options())
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state, load_file(ckpt / "rng.safetensors"))
    return state["loop"], best
