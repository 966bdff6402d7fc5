"""Checkpoints and resume under 2 gloo processes (torchrun, CPU).

A 2-process run killed after a checkpoint and continued with `--resume` ends exactly as the
2-process run that never stopped (final weights and metrics.jsonl), for DDP and FSDP; the FSDP
resume reads no pickle; a resume with another number of processes is refused with one line;
the delta report is written after a 2-process run. Each test starts torchrun three times (tens
of seconds); the model is the 2-layer conftest Llama.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import SRC
from deltatune.checkpoint import checkpoints, verify
from test_resume import logged, make_run

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
    lines = path.read_text(encoding="utf-8").splitlines() if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
    return all(json.loads(line) is not None for line in lines)


# (parallelism, method, how the first attempt ends, damage the newest checkpoint?, checkpoint the
# resume starts from, checkpoints at the end).
# step:7:SIGTERM@1: rank 1 alone gets SIGTERM after step 7, so both ranks must stop there together
# and write checkpoint-7. checkpoint-write:9: SIGKILL to rank 0 with checkpoint-9's shards written
# by both ranks, before its manifest and rename (checkpoint-9 must not exist). step:8: SIGKILL to
# every rank after step 8; then one flipped bit in rank 1's shard of checkpoint-6 makes `latest`
# pass it over for checkpoint-3.
CASES = [("ddp", "full", "step:7:SIGTERM@1", False, 7, [7, 9]),
         ("fsdp", "full", "checkpoint-write:9", False, 6, [6, 9]),
         ("fsdp", "lora", "step:8", True, 3, [6, 9])]


@pytest.mark.parametrize("parallelism, method, kill, damage_newest, resumed_from, kept", CASES)
def test_interrupted_run_resumes_to_the_same_end(parallelism, method, kill, damage_newest, resumed_from, kept,
                                                 tmp_path, tiny_model_dir):
    """Global batch 2 ranks x 2 x accumulation 2; 18 examples: 3 steps an epoch, the last one short
    (one rank gets a blank micro-batch); 10 steps; checkpoints every 3, logging every 4 (so each
    checkpoint carries a part-filled logging window, per rank), evaluation every 4 (checkpoint-6
    carries early-stopping state: patience 5, the best weights)."""
    settings = [f"parallelism={parallelism}", f"method={method}", "max_steps=10", "delta_report=false"]
    reference = make_run(tmp_path / "reference", tiny_model_dir, logging_steps=4)
    crashed = make_run(tmp_path / "crashed", tiny_model_dir, logging_steps=4)
    done = train(reference, *settings)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = train(crashed, *settings, kill=kill)
    assert killed.returncode != 0
    if "SIGTERM" in kill:  # one line, from rank 0, saying how to go on
        assert killed.stderr.count("stopped: SIGTERM after step 7; checkpoint ") == 1, killed.stderr[-3000:]
        assert f"continue with: deltatune train --nproc 2 {crashed} " in killed.stderr
    out = crashed.parent / "out"
    assert all(verify(c) is None for c in checkpoints(out))
    if damage_newest:
        shard = checkpoints(out)[-1] / "shard-00002-model-00001-of-00001.safetensors"
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
        assert verify(checkpoints(out)[-1]) == f"{shard.name} does not match its SHA-256 in the manifest"
    ckpt = out / f"checkpoint-{resumed_from}"
    assert [c for c in checkpoints(out) if verify(c) is None][-1] == ckpt
    saved = json.loads((ckpt / "state.json").read_text())
    assert saved["world_size"] == 2 and saved["step"] == resumed_from
    assert len(saved["loop"]["window_loss_by_rank"]) == 2 and saved["loop"]["window_loss_by_rank"][1] > 0
    files = sorted(p.name for p in ckpt.iterdir())
    if parallelism == "fsdp":  # each rank's shards, written by DCP as safetensors; no pickled .metadata
        assert files == ["manifest.json", "metrics.jsonl", "replicated.safetensors", "rng.safetensors",
                         "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors",
                         "state.json"]
        assert saved["has_best"] == (resumed_from == 6)
    else:  # DDP: what one process writes (best.safetensors: early stopping's best weights)
        assert files == ["best.safetensors", "manifest.json", "metrics.jsonl", "optimizer.safetensors",
                         "rng.safetensors", "state.json", "trainable.safetensors"]
    assert all(_is_json_or_safetensors(p) for p in ckpt.iterdir())
    assert set(load_file(ckpt / "rng.safetensors")) == {"rank0.torch", "rank1.torch"}
    if kill.startswith("checkpoint-write"):  # killed with the shards written, before the manifest and rename
        assert len(list(out.glob(".checkpoint-9.tmp-sharded/shard-*"))) == 2

    if parallelism == "ddp":  # another number of processes is refused with one line, before anything changes
        before = sorted(p.name for p in out.rglob("*"))
        for nproc in (1, 4):
            refused = train(crashed, *settings, "--resume", nproc=nproc)
            assert refused.returncode == 2, refused.stderr[-3000:]
            assert refused.stderr.count("\n") == 1
            assert f"written by 2 process(es), this run has {nproc}; resuming needs the same number" in refused.stderr
        assert sorted(p.name for p in out.rglob("*")) == before

    pickle_log = tmp_path / "pickle-attempts.log"
    resumed = train(crashed, *settings, "--resume", no_pickle_log=pickle_log)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not pickle_log.exists(), pickle_log.read_text()
    assert f"resuming from {ckpt} at step {resumed_from + 1}" in resumed.stdout
    if damage_newest:
        assert "resume: skipping" in resumed.stdout and "does not match its SHA-256" in resumed.stdout

    want = load_file(reference.parent / "out" / "final" / ("adapter_model.safetensors" if method == "lora" else "model.safetensors"))
    got = load_file(out / "final" / ("adapter_model.safetensors" if method == "lora" else "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert sorted(p.name for p in (out / "final").iterdir()) == sorted(p.name for p in (reference.parent / "out" / "final").iterdir())
    assert logged(out) == logged(reference.parent / "out")  # every step once, the same numbers
    assert [r["step"] for r in logged(out) if "loss" in r and "event" not in r] == [4, 8, 10]
    assert [c.name for c in checkpoints(out)] == [f"checkpoint-{n}" for n in kept]  # save_total_limit: 2
    assert not list(out.glob(".*")), "temporary or trash folders left behind"
    initial = load_file(tiny_model_dir / "model.safetensors")
    if method == "full":
        assert not torch.equal(got["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_delta_report_after_a_two_process_run(tmp_path, tiny_model_dir):
    """Rank 0 writes the report from final/ after the other rank has left; nothing hangs."""
    config = make_run(tmp_path, tiny_model_dir, max_steps=4)
    proc = train(config, "parallelism=fsdp", "save_steps=0", "ddp_timeout=60")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("report.md", "report.html", "delta.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "delta.json").read_text())
    assert report["tuned_model"] == str(out / "final")
    assert report["weights"]["relative_norm"] > 0  # the tuned weights differ from the base
    assert proc.stdout.count("delta report:") == 1
