"""Checkpoints and resume under 2 gloo processes (torchrun, CPU).

A 2-process run killed after a checkpoint and continued with `--resume` ends exactly as the
2-process run that never stopped (final weights and metrics.jsonl), for DDP and FSDP; the FSDP
resume reads no pickle; a resume with another number of processes is refused with one line;
the delta report is written after a 2-process run. Each torchrun launch costs ~25 s on the
2-core CPU (mostly imports), so the tests share launches: 8 in all. The model is the 2-layer
conftest Llama.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_distributed import _tied_model_dir
from test_resume import logged, make_run

from deltatune.train.checkpoint import checkpoints, verify

from conftest import SRC

NO_PICKLE_MAIN = Path(__file__).resolve().parent / "no_pickle_main.py"


def train(config: Path, *extra: str, nproc: int = 2, kill: str | None = None, no_pickle_log: Path | None = None):
    """`deltatune train --nproc N CONFIG ...`; with `no_pickle_log`, torchrun runs it through no_pickle_main.py."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DELTATUNE_TEST_KILL", None)
    env.pop("DELTATUNE_TEST_KILL_RANK", None)
    if kill:  # POINT:STEP[:SIGNAL][@RANK]
        env["DELTATUNE_TEST_KILL"], _, only_rank = kill.partition("@")
        if only_rank:
            env["DELTATUNE_TEST_KILL_RANK"] = only_rank
    if no_pickle_log:
        env["DELTATUNE_PICKLE_LOG"] = str(no_pickle_log)
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(NO_PICKLE_MAIN),
                   "train", str(config), *extra]
    else:
        command = ["-m", "deltatune", "train", "--nproc", str(nproc), str(config), *extra]
    return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=300)


def _is_json_or_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt"):
            return True
    lines = (path.read_text(encoding="utf-8").splitlines() if path.suffix == ".jsonl"
             else [path.read_text(encoding="utf-8")])
    return all(json.loads(line) is not None for line in lines)


def _assert_same_end(out: Path, reference_out: Path, method: str, kept: list[int]) -> None:
    """A resumed run's output_dir against the uninterrupted run's: bit-identical final weights,
    the same metrics.jsonl (wall-clock fields aside), pruned checkpoints, no leftovers."""
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    want, got = load_file(reference_out / "final" / weights), load_file(out / "final" / weights)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert (sorted(p.name for p in (out / "final").iterdir())
            == sorted(p.name for p in (reference_out / "final").iterdir()))
    assert logged(out) == logged(reference_out)  # every step once, the same numbers
    assert [r["step"] for r in logged(out) if "loss" in r and "event" not in r] == [4, 8, 10]
    assert [c.name for c in checkpoints(out)] == [f"checkpoint-{n}" for n in kept]  # save_total_limit: 2
    assert not list(out.glob(".*")), "temporary or trash folders left behind"


def _resume_without_pickle(config: Path, settings: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    pickle_log = tmp_path / "pickle-attempts.log"
    resumed = train(config, *settings, "--resume", no_pickle_log=pickle_log)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not pickle_log.exists(), pickle_log.read_text()
    return resumed


# Global batch 2 ranks x 2 x accumulation 2; 18 examples: 3 steps an epoch, the last one short
# (one rank gets a blank micro-batch); 10 steps; checkpoints every 3 (save_total_limit 2), logging
# every 4 (so a checkpoint carries a part-filled logging window, per rank), evaluation every 4
# (checkpoints from step 4 on carry early stopping's best weights: patience 5).
#
# (parallelism, how the first attempt ends, checkpoint the resume starts from, checkpoints at the end)
# step:7:SIGTERM@1: rank 1 alone gets SIGTERM after step 7, so both ranks must stop there together
# and write checkpoint-7. checkpoint-write:9: SIGKILL to rank 0 with checkpoint-9's shards written
# by both ranks, before its manifest and rename (checkpoint-9 must not exist). The FSDP model has
# a tied output head (as SmolLM2): one tensor under two names in FSDP's state dict.
CASES = [("ddp", "step:7:SIGTERM@1", 7, [7, 9]), ("fsdp", "checkpoint-write:9", 6, [6, 9])]


@pytest.mark.parametrize("parallelism, kill, resumed_from, kept", CASES)
def test_interrupted_run_resumes_to_the_same_end(parallelism, kill, resumed_from, kept, tmp_path, tiny_model_dir):
    settings = [f"parallelism={parallelism}", "max_steps=10", "delta_report=false"]
    if parallelism == "ddp":  # with AdamW's moments in bfloat16, whose rounding must resume exactly too
        settings.append("optimizer_state_dtype=bfloat16")
    model_dir = _tied_model_dir(tmp_path / "tied") if parallelism == "fsdp" else tiny_model_dir
    reference = make_run(tmp_path / "reference", model_dir, logging_steps=4)
    crashed = make_run(tmp_path / "crashed", model_dir, logging_steps=4)
    # The FSDP reference also writes the delta report (it does not change weights or metrics).
    done = train(reference, *settings, *(["delta_report=true"] if parallelism == "fsdp" else []))
    assert done.returncode == 0, done.stderr[-3000:]
    if parallelism == "fsdp":
        _assert_delta_report(reference.parent / "out", done.stdout)

    killed = train(crashed, *settings, kill=kill)
    assert killed.returncode != 0
    if "SIGTERM" in kill:  # one line, from rank 0, saying how to go on
        assert killed.stderr.count("stopped: SIGTERM after step 7; checkpoint ") == 1, killed.stderr[-3000:]
        assert f"continue with: deltatune train --nproc 2 {crashed} " in killed.stderr
    out = crashed.parent / "out"
    ckpt = out / f"checkpoint-{resumed_from}"
    assert checkpoints(out)[-1] == ckpt and all(verify(c) is None for c in checkpoints(out))
    saved = json.loads((ckpt / "state.json").read_text())
    assert saved["world_size"] == 2 and saved["step"] == resumed_from
    assert len(saved["loop"]["window_loss_by_rank"]) == 2 and saved["loop"]["window_loss_by_rank"][1] > 0
    files = sorted(p.name for p in ckpt.iterdir())
    if parallelism == "fsdp":  # each rank's shards, written by DCP as safetensors; no pickled .metadata
        assert files == ["manifest.json", "metrics.jsonl", "replicated.safetensors", "rng.safetensors",
                         "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors",
                         "state.json"]
        assert saved["has_best"]
        # killed with checkpoint-9's shards written, before its manifest and rename
        assert len(list(out.glob(".checkpoint-9.tmp-sharded/shard-*"))) == 2
    else:  # DDP: what one process writes (best.safetensors: early stopping's best weights)
        assert files == ["best.safetensors", "manifest.json", "metrics.jsonl", "optimizer.safetensors",
                         "rng.safetensors", "state.json", "trainable.safetensors"]
    assert all(_is_json_or_safetensors(p) for p in ckpt.iterdir())
    assert set(load_file(ckpt / "rng.safetensors")) == {"rank0.torch", "rank1.torch"}

    if parallelism == "ddp":  # another number of processes is refused with one line, before anything changes
        before = sorted(p.name for p in out.rglob("*"))
        for nproc in (1, 4):
            refused = train(crashed, *settings, "--resume", nproc=nproc)
            assert refused.returncode == 2, refused.stderr[-3000:]
            assert refused.stderr.count("\n") == 1
            assert f"written by 2 process(es), this run has {nproc}; resuming needs the same number" in refused.stderr
        assert sorted(p.name for p in out.rglob("*")) == before

    resumed = _resume_without_pickle(crashed, settings, tmp_path)
    assert f"resuming from {ckpt} at step {resumed_from + 1}" in resumed.stdout
    _assert_same_end(out, reference.parent / "out", "full", kept)
    initial = load_file(model_dir / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert not torch.equal(final["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_fsdp_lora_resume_passes_over_a_damaged_shard(tmp_path, tiny_model_dir):
    """FSDP + LoRA (only the adapters are in the checkpoint). The interrupted run is the finished
    run's output_dir as it was after step 10, before final/ (a copy with final/ and the summary
    removed: exactly what a kill there leaves), with one flipped bit in rank 1's shard of the newest
    checkpoint: `--resume` passes it over, continues from checkpoint-6 and ends as the run did."""
    settings = ["parallelism=fsdp", "method=lora", "max_steps=10", "delta_report=false"]
    reference = make_run(tmp_path / "reference", tiny_model_dir, logging_steps=4)
    done = train(reference, *settings)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(reference.parent, tmp_path / "crashed", symlinks=True)
    crashed, out = tmp_path / "crashed" / reference.name, tmp_path / "crashed" / "out"
    shutil.rmtree(out / "final")
    (out / "summary.md").unlink()
    assert [c.name for c in checkpoints(out)] == ["checkpoint-6", "checkpoint-9"]
    shard = out / "checkpoint-9" / "shard-00002-model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert verify(out / "checkpoint-9") == f"{shard.name} does not match its SHA-256 in the manifest"
    saved = json.loads((out / "checkpoint-6" / "state.json").read_text())
    assert saved["has_best"] and saved["world_size"] == 2
    with safe_open(out / "checkpoint-6" / "shard-00001-model-00001-of-00001.safetensors", framework="pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names if n.startswith("model/"))  # adapters only, not the base

    resumed = _resume_without_pickle(crashed, settings, tmp_path)
    assert "resume: skipping" in resumed.stdout and "does not match its SHA-256" in resumed.stdout
    assert f"resuming from {out / 'checkpoint-6'} at step 7" in resumed.stdout
    _assert_same_end(out, reference.parent / "out", "lora", [6, 9])


def _assert_delta_report(out: Path, stdout: str) -> None:
    """Rank 0 wrote the report from final/ after the other rank had left."""
    for name in ("report.md", "report.html", "delta.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "delta.json").read_text())
    assert report["tuned_model"] == str(out / "final")
    assert report["weights"]["relative_norm"] > 0  # the tuned weights differ from the base
    assert stdout.count("delta report:") == 1
