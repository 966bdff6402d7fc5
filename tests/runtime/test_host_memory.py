"""Host memory hygiene (host_memory.py): freed heap handed back, mapped weight pages dropped,
and neither changes a number."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama, make_tokenizer
from deltatune.runtime import host_memory
from deltatune.cli import main
from deltatune.config import build_config
from deltatune.errors import UserError
from test_lowp import write_run
from test_optimizer_in_backward import train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not host_memory.heap_trim_available(),
                                reason="Linux with glibc only (the feature is refused elsewhere: see the config test)")
MB = 1 << 20


def test_glibc_keeps_freed_chunks_pinned_by_small_ones_and_trim_hands_them_back():
    # 64 KB chunks stay under glibc's mmap threshold: they come from the heap, as a block's
    # temporaries do. A small allocation after each one pins it, like the tensors a forward
    # pass keeps for backward.
    big, small = [], []
    for _ in range(3000):
        big.append(torch.ones(16384))  # 64 KB
        small.append(torch.ones(4))
    before_free = host_memory.resident_bytes()
    del big
    kept = host_memory.resident_bytes()
    host_memory.trim_heap()
    after = host_memory.resident_bytes()
    assert before_free - kept < 50 * MB, "glibc returned the freed chunks by itself: nothing to trim"
    assert kept - after > 100 * MB, f"trim returned only {(kept - after) / MB:.0f} MB of ~190 MB freed"
    assert all(float(t.sum()) == 4 for t in small)


def test_page_out_drops_mapped_file_pages_and_keeps_every_value(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(16 * MB, dtype=torch.float32)}, str(path))  # 64 MB
    mapped = load_file(str(path))["w"]
    expected = float(torch.arange(16 * MB, dtype=torch.float64).sum())
    assert float(mapped.double().sum()) == expected  # reads every page: now resident
    resident = host_memory.resident_bytes()
    host_memory.page_out([mapped])
    assert resident - host_memory.resident_bytes() > 40 * MB
    assert float(mapped.double().sum()) == expected  # faulted in again from the file
    # Anonymous memory (no swap here) and written pages keep their contents.
    anonymous = torch.randn(4 * MB)
    copy = anonymous.clone()
    mapped[:1000] = -1
    host_memory.page_out([anonymous, mapped])
    assert torch.equal(anonymous, copy) and float(mapped[:1000].sum()) == -1000


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trimming_between_blocks_changes_no_number_and_leaves_no_hook(tmp_path, monkeypatch, checkpointing):
    base = make_tiny_llama(make_tokenizer(), seed=5)
    plain, a = train(tmp_path / "a", gradient_checkpointing=checkpointing)
    trims = []
    real_trim = host_memory.trim_heap
    monkeypatch.setattr(host_memory, "trim_heap", lambda: (trims.append(1), real_trim()))
    monkeypatch.setattr(host_memory, "TRIM_AFTER_GROWTH", -1)  # trim at every chance: each hook is exercised
    trimmed, b = train(tmp_path / "b", gradient_checkpointing=checkpointing, cpu_heap_trim=True)
    # 2 blocks, 6 steps of 2 micro-batches: before each block's forward and before its backward.
    assert len(trims) >= 2 * 2 * 6 * 2
    for (name, p), q, p0 in zip(plain.named_parameters(), trimmed.parameters(), base.parameters()):
        assert not torch.equal(p, p0), f"{name} did not train"
        assert torch.equal(p, q), name
    losses = [r["loss"] for r in b.history if "loss" in r]
    assert losses == [r["loss"] for r in a.history if "loss" in r] and losses[-1] < losses[0]
    for block in trimmed.model.layers:  # the hooks end with fit: evaluation runs without them
        assert not block._forward_pre_hooks and not block._forward_hooks


def test_config_refuses_it_without_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "heap_trim_available", lambda: False)
    with pytest.raises(UserError, match="cpu_heap_trim: true needs glibc"):
        build_config(dict(train_file="t.jsonl", cpu_heap_trim=True), "run.yaml")
    assert not build_config(dict(train_file="t.jsonl"), "run.yaml").cpu_heap_trim


def test_cli_run_with_the_lean_lora_settings(tmp_path, tiny_model_dir, monkeypatch):
    """cpu_heap_trim with checkpointing and float16 frozen storage, from the CLI to the delta report."""
    monkeypatch.chdir(tmp_path)
    trims = []
    real_trim = host_memory.trim_heap
    monkeypatch.setattr(host_memory, "trim_heap", lambda: (trims.append(1), real_trim()))
    monkeypatch.setattr(host_memory, "TRIM_AFTER_GROWTH", -1)
    config = write_run(tmp_path, tiny_model_dir, "cpu_heap_trim: true\ngradient_checkpointing: true\n")
    assert main(["train", str(config)]) == 0
    assert len(trims) >= 6 * 2 * 2  # 6 steps, 2 blocks, forward and backward
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and "event" not in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "report.md").is_file()
