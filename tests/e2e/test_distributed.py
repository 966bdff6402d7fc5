"""Two gloo processes on CPU: the same training as one process, the same output folder, no hangs.

Each multi-process test starts torchrun (`python -m torch.distributed.run --standalone`), so
these tests take tens of seconds each; the model is the 2-layer conftest Llama.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from dist_worker import train_case

from conftest import SRC, chat, make_tiny_llama, make_tokenizer, run_cli, write_jsonl

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
CASES = ["ddp", "fsdp", "ddp-lora", "fsdp-lora"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false", **extra}


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict:
    """One torchrun launch, 2 ranks, every case in turn (starting torchrun costs more than a case)."""
    out = tmp_path_factory.mktemp("two-procs") / "results.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(out), *CASES], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def _series(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if key in h]


@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_exactly_like_one(case, two_process_results, tmp_path):
    """2 ranks x batch 2 x accumulation 2 == 1 process x batch 4 x accumulation 2: same losses,
    gradient norms, token counts and final weights (to float rounding)."""
    two = two_process_results[case]
    one = train_case(case, world=1, out_dir=tmp_path)
    assert two["wrapper"] == ("DistributedDataParallel" if case.startswith("ddp") else "FSDP_Shell")
    assert one["wrapper"] != two["wrapper"]  # the reference really ran unwrapped
    assert two["steps"] == one["steps"] == 4
    assert two["trained_tokens"] == one["trained_tokens"]
    assert two["base_loss"] == pytest.approx(one["base_loss"], rel=1e-6)
    for key in ("loss", "eval_loss", "grad_norm"):
        assert _series(two["history"], key) == pytest.approx(_series(one["history"], key), rel=1e-5), key
    assert len(_series(two["history"], "eval_loss")) == 2
    assert set(two["state"]) == set(one["state"])
    changed = 0
    for name, initial in one["initial"].items():
        torch.testing.assert_close(two["state"][name], one["state"][name], atol=1e-6, rtol=1e-5, msg=name)
        if torch.equal(one["state"][name], initial):
            # Frozen (LoRA base) weights: bit-identical on both sides.
            assert "lora" in case and "lora_" not in name, f"{name} did not train"
            assert torch.equal(two["state"][name], initial), name
        else:
            changed += 1
    assert changed == (8 if "lora" in case else len(one["initial"]))  # 2 layers x (q, v) x (A, B)


def _tied_model_dir(folder: Path) -> Path:
    """A tiny Llama whose output head is its input embedding, as in SmolLM2."""
    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer, seed=3)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _job(tmp_path: Path, **overrides) -> Path:
    words = ["fox", "dog", "cat", "sun", "sky", "tea", "hello"]
    write_jsonl(tmp_path / "train.jsonl",
                [chat(f"say {words[i % 7]}", f"{words[i % 7]} " * (1 + i % 3)) for i in range(22)])
    write_jsonl(tmp_path / "test.jsonl", [chat(f"say {w}", w) for w in words[:3]])
    config = {"model": str(_tied_model_dir(tmp_path / "model")), "train_file": "train.jsonl", "test_file": "test.jsonl",
              "validation_split": 0.1, "learning_rate": 1e-3, "num_train_epochs": 2, "logging_steps": 1, "bf16": False,
              "max_new_tokens": 4, "max_seq_length": 64, "max_grad_norm": 1.0, **overrides}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _unshard(ckpt: Path) -> dict[str, torch.Tensor]:
    """The weights of an FSDP checkpoint: every rank's shards joined along dim 0 by their saved offsets."""
    from safetensors import safe_open

    prefix, pieces = "model/model.", {}  # DCP key: "model/" + the FSDP shell's name for the weight
    for f in sorted(ckpt.glob("shard-*.safetensors")):
        with safe_open(f, framework="pt") as st:
            offsets = json.loads(st.metadata()["DCP_SHARDING_INFO"])
            for key in st.keys():
                if key.startswith(prefix):
                    pieces.setdefault(key[len(prefix):], []).append((offsets[key]["saved_offsets"], st.get_tensor(key)))
    assert len(list(ckpt.glob("shard-*.safetensors"))) == 2
    return {k: torch.cat([t for _, t in sorted(v, key=lambda x: x[0])]) for k, v in pieces.items()}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_fsdp_run_writes_what_a_single_process_run_writes(tmp_path):
    """`deltatune train --nproc 2` with FSDP: one metrics log, the same final/ folder (tied weights
    saved once), sharded checkpoints of the same weights, and the same training curve as one
    process with the same global batch."""
    from safetensors.torch import load_file

    from deltatune.config import load_config
    from deltatune.pipeline import run
    from deltatune.train.checkpoint import verify

    config = _job(tmp_path, save_steps=5)
    run(load_config(config, [f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=4"]))
    proc = run_cli("train", "--nproc", "2", str(config), f"output_dir={tmp_path / 'two'}",
                   "per_device_train_batch_size=2", "parallelism=fsdp", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("tuned model:") == 1  # only rank 0 prints

    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in (one / "final").iterdir()) == sorted(p.name for p in (two / "final").iterdir())
    # One process writes trainable.safetensors; two FSDP processes write each rank's shard (DCP,
    # safetensors with the offsets in the header). Put back together they are the same weights.
    assert verify(two / "checkpoint-5") is None
    c1, c2 = load_file(one / "checkpoint-5" / "trainable.safetensors"), _unshard(two / "checkpoint-5")
    assert set(c1) == set(c2)  # the tied head is stored once, under the embeddings' name
    for name in c1:
        torch.testing.assert_close(c2[name], c1[name], atol=1e-6, rtol=1e-5, msg=name)
    assert (json.loads((one / "final" / "config.json").read_text())
            == json.loads((two / "final" / "config.json").read_text()))
    w1, w2 = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert set(w1) == set(w2) and "lm_head.weight" not in w2  # the tied head is stored once, as on one process
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-6, rtol=1e-5, msg=name)
    initial = load_file(tmp_path / "model" / "model.safetensors")
    assert not torch.equal(w2["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])

    m1, m2 = _metrics(one), _metrics(two)
    assert [m["world_size"] for m in m2 if m.get("event") == "start"] == [2]  # one writer, not two
    assert _series(m2, "loss") == pytest.approx(_series(m1, "loss"), rel=1e-5)
    assert len([m for m in m2 if "learning_rate" in m]) == 10  # training steps (plus base and tuned evaluation)
    assert (two / "summary.md").is_file() and (two / "config.yaml").is_file()


@pytest.mark.parametrize("fault, parallelism", [("1:2", "ddp"), ("1:2:hang", "fsdp")])
def test_a_failing_rank_ends_the_job_with_an_error(fault, parallelism, tmp_path):
    """Rank 1 raises (or stops answering) at step 2: the job exits non-zero, well within the
    timeout, names the failure, and writes no final/."""
    config = _job(tmp_path, test_file=None, per_device_train_batch_size=2, parallelism=parallelism, ddp_timeout=10)
    start = time.monotonic()
    env = _env(DELTATUNE_TEST_FAULT=fault)
    proc = subprocess.run([sys.executable, "-m", "deltatune", "train", "--nproc", "2", str(config),
                           f"output_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 150, elapsed
    if fault.endswith("hang"):
        assert "did not answer within ddp_timeout=10s" in proc.stderr
    else:
        assert "RuntimeError: rank 1: failure injected by DELTATUNE_TEST_FAULT at step 2" in proc.stderr
    assert "ChildFailedError" in proc.stderr  # torchrun's summary of which rank failed
    assert not (tmp_path / "run" / "final").exists()
    assert max(m["step"] for m in _metrics(tmp_path / "run")) < 2


def test_nproc_checks_the_config_before_starting_processes(tmp_path):
    proc = run_cli("train", "--nproc", "2", str(_job(tmp_path, parallelism="tp")), timeout=120)
    assert proc.returncode == 2
    assert "parallelism" in proc.stderr and "torch.distributed" not in proc.stderr
    assert proc.stderr.count("error:") == 1


def test_cpu_offload_needs_fsdp_and_cuda(tmp_path):
    from deltatune.config import build_config
    from deltatune.errors import UserError
    from deltatune.pipeline import preflight

    base = {"train_file": "t.jsonl", "output_dir": str(tmp_path), "fsdp_cpu_offload": True}
    with pytest.raises(UserError, match="needs parallelism: fsdp"):
        build_config({**base, "parallelism": "ddp"}, "run.yaml")
    with pytest.raises(UserError, match="needs CUDA"):  # refused before any model is loaded
        preflight(build_config({**base, "parallelism": "fsdp"}, "run.yaml"))
