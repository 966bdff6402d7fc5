"""Crash-safe checkpoints and exact resume.

A checkpoint holds everything the training loop needs to go on as if it had never stopped:
the trainable weights (the whole model for full fine-tuning, only the adapter where only the
adapter trains), AdamW's moments, the scheduler position, every RNG state, the data order left
in the epoch, the logging window, early-stopping state and the metrics written so far.
Checkpoints are taken between optimizer steps, so the gradient-accumulation window is empty.

Files go into a hidden temporary folder, are fsync'd, listed with size and SHA-256 in
`manifest.json` (written last), and the folder is renamed into place: a kill at any instant
leaves the previous checkpoint whole and at worst a temporary folder the next resume deletes.
A checkpoint is trusted only when its manifest checks out. No pickle anywhere: tensors go to
safetensors, everything else to JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
from array import array
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from deltatune.config import default
from deltatune.config_text import REMOVED_KEYS, fold_old_keys
from deltatune.data.cache import ExampleTable
from deltatune.data.stream import ExampleStream
from deltatune.errors import UserError
from deltatune.files import check_space, fsync_path, has_content, inject_write_fault, sha256_file, writing
from deltatune.model.load import weights_dtype
from deltatune.runtime import distributed
from deltatune.runtime.faults import crash_point

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
# Keys that may differ between a run and its resumption without changing what it computes. Data
# paths may be spelled differently from another directory; the data itself is fingerprinted.
RESUME_FREE_KEYS = {"resume_from_checkpoint", "overwrite_output_dir", "output_dir", "train_file",
                    "validation_file", "test_file", "model"}


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"{signal.Signals(signum).name} after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM


# --- files -----------------------------------------------------------------------------------

def _remove(path: Path) -> None:
    """Delete a checkpoint folder; renamed first so a kill mid-delete never leaves a torn `checkpoint-N`."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def checkpoints(out_dir: Path) -> list[Path]:
    """`checkpoint-N` folders of a run, oldest first."""
    found = [p for p in out_dir.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)




def data_fingerprint(examples) -> str:
    """Hash of the tokenised training data: resuming on different data would not continue the run."""
    digest = hashlib.sha256()
    if isinstance(examples, (ExampleTable, ExampleStream)):  # hashed without building each example
        examples.fingerprint(digest)
        return digest.hexdigest()
    for ex in examples:  # token types and rejected sides only where there are some: others hash as they always did
        digest.update(array("q", [len(ex.input_ids), *ex.input_ids, *ex.labels, *(ex.token_type_ids or [])]).tobytes())
        if ex.rejected is not None:
            digest.update(array("q", [len(ex.rejected.input_ids), *ex.rejected.input_ids,
                                      *ex.rejected.labels]).tobytes())
    return digest.hexdigest()


# --- writing ---------------------------------------------------------------------------------

def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's torch (and CUDA) generator states."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def run_state(step: int, config: dict, loop: dict, scheduler, optimizer: dict) -> dict:
    """What state.json holds: everything but tensors (Python/NumPy RNGs included); `config`: the flat config."""
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    return {"step": step, "world_size": distributed.world_size(), "loop": loop, "config": config,
            "optimizer": optimizer, "scheduler": scheduler.state_dict(),
            "python_rng": [py_rng[0], list(py_rng[1]), py_rng[2]],
            "numpy_rng": [np_rng[0], np_rng[1].tolist(), *np_rng[2:]]}


def write_run_files(tmp: Path, state: dict, metrics_path: Path | None) -> None:
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    # The log as of this step: a resume restores exactly these lines.
    if metrics_path is not None and metrics_path.is_file():
        shutil.copyfile(metrics_path, tmp / "metrics.jsonl")


def seal(tmp: Path, target: Path, out_dir: Path, step: int) -> None:
    """fsync every file of `tmp`, list them in the manifest (written last) and rename `tmp` to `target`."""
    crash_point("checkpoint-write", step)
    files = {}
    for f in sorted(tmp.iterdir()):
        fsync_path(f)
        files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)
    if target.exists():  # left by an abandoned continuation of this run
        _remove(target)
    os.replace(tmp, target)
    fsync_path(out_dir)


def prune(out_dir: Path, keep: int | None) -> None:
    if keep:
        for old in checkpoints(out_dir)[:-keep]:
            _remove(old)


def write_and_seal(tmp: Path, target: Path, out_dir: Path, step: int, *, tensors: dict[str, dict], state: dict,
                   rng: dict[str, torch.Tensor], metrics_path: Path | None, keep: int | None) -> None:
    """Write `tensors` ({file name: {name: tensor}}), the RNGs and the run files into `tmp`, seal it
    as `target`, then prune to `keep` checkpoints. `tmp` is gone afterwards, whatever happened."""
    try:
        inject_write_fault("checkpoint", step)
        for name, content in tensors.items():
            save_file(content, tmp / name)
        save_file(rng, tmp / "rng.safetensors")
        write_run_files(tmp, state, metrics_path)
        seal(tmp, target, out_dir, step)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    crash_point("checkpoint-renamed", step)
    prune(out_dir, keep)


def save_checkpoint(out_dir: Path, step: int, config: dict, model, optimizer, scheduler, loop: dict,
                    best_state: dict | None, metrics_path: Path | None, rng: dict[str, torch.Tensor] | None = None,
                    keep: int | None = None) -> Path | None:
    """Write `out_dir/checkpoint-STEP` atomically and prune to `keep`; None if weights are not finite.

    `config`: the flat config (a resume compares it). `rng`: generator states to store instead of
    this process's own (DDP: every rank's)."""
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    if not all(bool(torch.isfinite(t).all()) for t in trainable.values()):
        print(f"step {step}: weights are not finite; no checkpoint written (the last good one is kept)", flush=True)
        return None
    opt = optimizer.state_dict()
    tensors = {"trainable.safetensors": trainable,
               "optimizer.safetensors": {f"{i}.{k}": v.contiguous().cpu() for i, s in opt["state"].items()
                                         for k, v in s.items() if torch.is_tensor(v)}}
    if best_state is not None:
        tensors["best.safetensors"] = {n: t.contiguous().cpu() for n, t in best_state.items()}
    opt_other = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items() if not torch.is_tensor(v)}
    state = run_state(step, config, loop, scheduler, {"param_groups": opt["param_groups"], "other": opt_other})
    target = out_dir / f"{PREFIX}{step}"
    size = sum(t.numel() * t.element_size() for content in tensors.values() for t in content.values())
    hint = resume_hint(out_dir)
    check_space(target.name, out_dir, size, hint)  # a write that cannot finish is not started
    with writing(target.name, out_dir, size, hint):
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{target.name}.tmp-"))
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is as readable as the rest of the run
        write_and_seal(tmp, target, out_dir, step, tensors=tensors, state=state,
                       rng=rng if rng is not None else rng_tensors(), metrics_path=metrics_path, keep=keep)
    return target


def resume_hint(out_dir: Path) -> str:
    """What to do after a checkpoint could not be written: the previous one is whole."""
    last = checkpoints(out_dir)
    kept = f"the last checkpoint, {last[-1].name}, is intact" if last else "no checkpoint was written yet"
    return f"{kept}; free some space and continue with --resume"


# --- reading ---------------------------------------------------------------------------------

def verify(ckpt: Path) -> str | None:
    """None when every file of the manifest is there with its size and hash; else what is wrong."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "no manifest.json: its write did not finish"
    except (ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for name, meta in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported and passed over."""
    for ckpt in reversed(checkpoints(out_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        print(f"resume: skipping {ckpt} ({problem})", flush=True)
    return None


BEFORE_THE_KEY = {"torch_dtype": "float32"}  # what runs from before a key computed, where not its default


def _config_differences(saved: dict, cfg) -> list[str]:
    now = cfg.flat()
    if now.get("torch_dtype") == "auto":  # a config not yet resolved (the launcher's) says what it will load
        now["torch_dtype"] = weights_dtype(cfg.model)
    # A key since removed was stored by older runs; left off (falsy), it computed what runs without it compute.
    # A key added since is missing from theirs; at its default, it computes what they computed.
    saved = {k: v for k, v in fold_old_keys(saved, "the checkpoint's config.yaml").items()
             if not (k in REMOVED_KEYS and not v)}
    saved = {**{k: v for k, v in now.items() if k not in saved and v in (default(k), BEFORE_THE_KEY.get(k))},
             **saved}
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in RESUME_FREE_KEYS and saved.get(k) != now.get(k)]


def find_resume_checkpoint(cfg, world_size: int = 1) -> Path | None:
    """The checkpoint `resume_from_checkpoint` asks for (None: start at step 0), checked before anything loads.

    `world_size`: processes of the run that resumes; it must be the checkpoint's (each rank's share
    of every step, its RNG and, under FSDP, its shard depend on it)."""
    resume_from = cfg.output.resume_from_checkpoint
    if resume_from is None:
        return None
    out = Path(cfg.output.output_dir)
    own_config = out / "config.yaml"
    if out.is_dir() and has_content(out) and not cfg.output.overwrite_output_dir:
        saved = yaml.safe_load(own_config.read_text(encoding="utf-8")) if own_config.is_file() else None
        if not isinstance(saved, dict) or _config_differences(saved, cfg):
            why = "; ".join(_config_differences(saved, cfg)[:3]) if isinstance(saved, dict) else "no config.yaml"
            raise UserError(f"output_dir '{out}' holds a different run ({why}); resume with that run's config, "
                            "or choose a new output_dir")
    if resume_from == "latest":
        ckpt = latest_checkpoint(out) if out.is_dir() else None
        if ckpt is None:
            print(f"resume: no complete checkpoint in {out} yet; starting at step 0", flush=True)
            return None
    else:
        ckpt = Path(resume_from)
        if not ckpt.is_dir():
            raise UserError(f"resume_from_checkpoint '{ckpt}': no such checkpoint folder "
                            "(give a checkpoint-N folder, or latest)")
        problem = verify(ckpt)
        if problem:
            raise UserError(f"{ckpt}: checkpoint is incomplete or damaged ({problem}); resume from an older "
                            "checkpoint, or use resume_from_checkpoint: latest")
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    diffs = _config_differences(state["config"], cfg)
    if diffs:
        raise UserError(f"{ckpt}: written with a different config ({'; '.join(diffs[:3])}); resuming would not "
                        "continue the same run (restore those values, or start a new output_dir)")
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        raise UserError(f"{ckpt}: written by {saved_world} process(es), this run has {world_size}; resuming needs "
                        f"the same number (run with --nproc {saved_world}, or start a new output_dir)")
    return ckpt


def restore_run_files(out_dir: Path, ckpt: Path | None) -> int:
    """Make output_dir as it was when `ckpt` was written (step 0 if None); return that step.

    A killed run may have logged steps and written checkpoints past the one resumed from: they
    are dropped, so the resumed log has neither gaps nor duplicates.
    """
    for junk in [*out_dir.glob(f".{PREFIX}*.tmp-*"), *out_dir.glob(".trash-*")]:
        shutil.rmtree(junk, ignore_errors=True)
    step = 0 if ckpt is None else json.loads((ckpt / "state.json").read_text(encoding="utf-8"))["step"]
    for later in checkpoints(out_dir):
        if step_of(later) > step:
            _remove(later)
    metrics = out_dir / "metrics.jsonl"
    if ckpt is not None and (ckpt / "metrics.jsonl").is_file():
        shutil.copyfile(ckpt / "metrics.jsonl", metrics.with_suffix(".tmp"))
        os.replace(metrics.with_suffix(".tmp"), metrics)
    else:
        metrics.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
    return step


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> tuple[dict, dict | None]:
    """Restore weights, optimizer, scheduler and RNGs in place; return (loop state, early-stopping best weights)."""
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    params = dict(model.named_parameters())
    weights = load_file(ckpt / "trainable.safetensors")
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable or any(params[n].shape != t.shape for n, t in weights.items()):
        raise UserError(f"{ckpt}: its weights do not match this model's trainable parameters "
                        "(was the run started with another model or method?)")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    per_param: dict[int, dict] = {}
    for key, value in load_file(ckpt / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for key, value in state["optimizer"]["other"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state, load_file(ckpt / "rng.safetensors"))
    best = ckpt / "best.safetensors"
    return state["loop"], (load_file(best) if best.is_file() else None)


def restore_rng(state: dict, rng: dict[str, torch.Tensor]) -> None:
    """Set every generator as the checkpoint has it. Several processes store each rank's torch and
    CUDA states as `rankN.torch`, `rankN.cuda.I`; Python's and NumPy's are rank 0's (every rank
    seeds them alike and the loop draws nothing from them)."""
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    prefix = f"rank{distributed.rank()}." if f"rank{distributed.rank()}.torch" in rng else ""
    torch.set_rng_state(rng[prefix + "torch"])
    cuda = []
    while f"{prefix}cuda.{len(cuda)}" in rng:
        cuda.append(rng[f"{prefix}cuda.{len(cuda)}"])
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# --- signals ---------------------------------------------------------------------------------

@contextmanager
def stop_on_signals():
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second one aborts."""
    request = SimpleNamespace(signum=None)
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield request
        return

    def handler(signum, frame):
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum
        print(f"{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
