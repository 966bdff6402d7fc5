"""Crash safety through the CLI: kill -9 at several points, resume, end bit-identical; signals; NaN guard."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.train.checkpoint import checkpoints, verify

from conftest import SRC, chat, make_tiny_llama, make_tokenizer, run_fit, write_jsonl

WORDS = ["fox", "dog", "cat", "sun", "sky", "tea"]
# 18 training examples, 4 per step -> 5 steps per epoch (the last one short): 12 steps cross two
# epoch boundaries; logging (2), evaluation (4) and checkpoints (3) are deliberately out of phase.
CONFIG = """model: model
train_file: data/train.jsonl
output_dir: out
validation_split: 0.25
learning_rate: 5.0e-3
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
max_steps: {max_steps}
save_steps: 3
save_total_limit: 2
logging_steps: {logging_steps}
eval_steps: 4
warmup_steps: 2
lr_scheduler_type: cosine
early_stopping_patience: 5
bf16: false
metric: none
"""


def make_run(root, model_dir, max_steps=12, logging_steps=2):
    """A run folder with relative paths only: config, data and a link to the model."""
    (root / "data").mkdir(parents=True)
    write_jsonl(root / "data" / "train.jsonl", [chat(f"say {w}", f"{w} {w}") for w in WORDS * 4])
    (root / "model").symlink_to(model_dir)
    config = root / "run.yaml"
    config.write_text(CONFIG.format(max_steps=max_steps, logging_steps=logging_steps))
    return config


def logged(out):
    """Every training/eval record without the wall-clock fields, in file order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    volatile = {"tokens_per_second", "elapsed_seconds"}
    return [{k: v for k, v in r.items() if k not in volatile} for r in rows if r.get("event") != "resume"]


def cli(*args, env_kill=None, timeout=300):
    env = {"PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    if env_kill:
        env["DELTATUNE_TEST_KILL"] = env_kill
    return subprocess.run([sys.executable, "-m", "deltatune", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_kill_anywhere_then_resume_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch, capsys):
    reference = make_run(tmp_path / "reference", tiny_model_dir)
    crashed = make_run(tmp_path / "crashed", tiny_model_dir)
    monkeypatch.chdir(tmp_path)  # not the config's folder: paths resolve relative to the config file
    assert main(["train", str(reference)]) == 0
    out = tmp_path / "crashed" / "out"

    # One run, crashed again and again: each crash is resumed by the next attempt.
    # step:N = SIGKILL after step N (its log lines written, before its checkpoint);
    # checkpoint-write:N = SIGKILL with checkpoint-N's files written but not yet renamed into place;
    # checkpoint-renamed:N = SIGKILL after the rename, before older checkpoints are pruned.
    # The last one is a SIGTERM in this process (its handler is what is tested, not process death).
    chain = [("step:2", -9), ("checkpoint-write:6", -9), ("checkpoint-renamed:9", -9), ("step:11:SIGTERM", 143)]
    for attempt, (point, expected_rc) in enumerate(chain):
        args = ["train", str(crashed), *(["--resume"] if attempt else [])]
        if expected_rc == -9:
            proc = cli(*args, env_kill=point)
            stderr = proc.stderr
            assert proc.returncode == expected_rc, stderr
        else:
            monkeypatch.setenv("DELTATUNE_TEST_KILL", point)
            assert main(args) == expected_rc
            monkeypatch.delenv("DELTATUNE_TEST_KILL")
            stderr = capsys.readouterr().err
        assert all(verify(c) is None for c in checkpoints(out)), "a torn checkpoint is visible"
        if point == "step:2":
            assert checkpoints(out) == []
        if point == "checkpoint-write:6":
            assert [c.name for c in checkpoints(out)] == ["checkpoint-3"]
            assert list(out.glob(".checkpoint-6.tmp-*")), "the kill should have left a torn temporary folder"
        if point == "checkpoint-renamed:9":
            assert [c.name for c in checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
        if expected_rc == 143:
            assert "SIGTERM after step 11" in stderr and stderr.splitlines()[-1].endswith(f"{crashed} --resume")
            assert (out / "checkpoint-11").is_dir() and not (out / "final").exists()

    assert main(["train", str(crashed), "--resume"]) == 0
    want = load_file(tmp_path / "reference" / "out" / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # The log reads as one uninterrupted run: every step once, the same numbers, in order.
    assert logged(out) == logged(tmp_path / "reference" / "out")
    steps = [r["step"] for r in logged(out) if "loss" in r and "event" not in r]
    assert steps == [2, 4, 6, 8, 10, 12]
    assert [c.name for c in checkpoints(out)] == ["checkpoint-9", "checkpoint-11"]  # save_total_limit: 2
    assert not list(out.glob(".*")), "temporary or trash folders left behind"


def test_sigint_writes_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir, capsys):
    config = make_run(tmp_path, tiny_model_dir, max_steps=100000, logging_steps=1)
    env = {"PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "train", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and '"step": 2, "epoch"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: SIGINT after step") and last.endswith(f"deltatune train {config} --resume")
    stopped_at = int(last.split("after step ")[1].split(";")[0])
    saved = checkpoints(tmp_path / "out")  # save_steps may have written earlier ones too, depending on speed
    assert saved[-1].name == f"checkpoint-{stopped_at}" and verify(saved[-1]) is None
    assert not (tmp_path / "out" / "final").exists()

    # A resume that changes the run is refused: it would not continue the same run.
    assert main(["train", str(config), "max_steps=10", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds a different run (max_steps: 100000 -> 10)" in err and err.count("\n") == 1


def test_resume_refuses_a_foreign_output_dir(tmp_path, tiny_model_dir, capsys):
    config = make_run(tmp_path, tiny_model_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["train", str(config), "--resume"]) == 2
    assert "holds a different run (no config.yaml)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# --- numerical faults and determinism (the loop directly; fast) --------------------------------

def _fit(tmp_path, loss_fn=None, **overrides):
    from deltatune.config import build_config
    from deltatune.data.examples import build_sft_examples
    from deltatune.data.formats import Record
    from deltatune.evaluate.loss import causal_lm_loss
    from deltatune.train.metrics_log import MetricsLog

    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer, seed=3)
    records = [Record(messages=chat(f"say {w}", f"{w} {w} {w}")["messages"], source=f"t:{i}")
               for i, w in enumerate(WORDS * 2)]
    examples, _ = build_sft_examples(records, tokenizer, max_seq_length=64)
    settings = dict(train_file="unused.jsonl", output_dir=str(tmp_path), learning_rate=1e-2, max_steps=8,
                    logging_steps=1, bf16=False, per_device_train_batch_size=4, max_grad_norm=1.0, **overrides)
    cfg = build_config(settings, "test")
    tmp_path.mkdir(exist_ok=True)
    log = MetricsLog(tmp_path)
    try:
        result = run_fit(model, tokenizer, examples, [], cfg, tmp_path, log, torch.device("cpu"),
                     loss_fn=loss_fn or causal_lm_loss)
    finally:
        log.close()
    return model, result


def nan_at(steps):
    """causal_lm_loss, except the given optimizer steps (1-based; one micro-batch each) return NaN."""
    from deltatune.evaluate.loss import causal_lm_loss

    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, n = causal_lm_loss(model, batch)
        return (loss * float("nan"), n) if calls["n"] in steps else (loss, n)
    return loss_fn


def test_same_seed_gives_identical_loss_curve(tmp_path):
    model_a, a = _fit(tmp_path / "a")
    model_b, b = _fit(tmp_path / "b")
    curve = [r["loss"] for r in a.history if "loss" in r]
    assert len(curve) == 8 and curve[-1] < curve[0]
    assert curve == [r["loss"] for r in b.history if "loss" in r]
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    model, result = _fit(tmp_path, loss_fn=nan_at({3, 6}))
    assert result.skipped_steps == 2 and result.steps == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "nonfinite_skipped"] == [3, 6]
    assert all(r["loss"] == r["loss"] for r in result.history if "loss" in r)  # no NaN in the logged curve


def test_nonfinite_in_a_row_stops_and_keeps_last_good_checkpoint(tmp_path):
    from deltatune.errors import UserError

    with pytest.raises(UserError) as err:
        _fit(tmp_path, loss_fn=nan_at(set(range(3, 100))), save_steps=2)
    message = str(err.value)
    assert message.startswith("step 5: loss or gradient norm not finite for 3 steps in a row")
    assert "learning_rate" in message and "check the data" in message
    # Steps 3 and 4 were skipped, so checkpoint-4 holds exactly the weights after step 2.
    assert message.endswith(str(tmp_path / "checkpoint-4"))
    after_2 = load_file(tmp_path / "checkpoint-2" / "trainable.safetensors")
    after_4 = load_file(tmp_path / "checkpoint-4" / "trainable.safetensors")
    assert all(torch.equal(after_2[n], after_4[n]) for n in after_2)


def test_nan_weights_never_become_final(tmp_path, capsys):
    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    tokenizer.save_pretrained(tmp_path / "nan-model")
    write_jsonl(tmp_path / "train.jsonl", [chat(f"say {w}", f"{w} {w}") for w in WORDS * 2])
    config = tmp_path / "run.yaml"
    config.write_text("model: nan-model\ntrain_file: train.jsonl\noutput_dir: out\nmax_steps: 6\nbf16: false\n"
                      "per_device_train_batch_size: 2\nvalidation_split: 0\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "error: step 3: loss or gradient norm not finite for 3 steps in a row" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "final").exists()


def test_damaged_newest_checkpoint_is_passed_over(tmp_path):
    from deltatune.config import build_config
    from deltatune.train.checkpoint import latest_checkpoint, restore_run_files, save_checkpoint

    cfg = build_config({"train_file": "t.jsonl", "output_dir": str(tmp_path)}, "test")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in (1, 2):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        save_checkpoint(tmp_path, step, cfg.flat(), model, optimizer, scheduler, {"step": step}, None,
                        tmp_path / "none")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    moments = tmp_path / "checkpoint-2" / "optimizer.safetensors"
    data = bytearray(moments.read_bytes())
    data[-1] ^= 1  # one flipped bit, same size
    moments.write_bytes(bytes(data))
    assert verify(tmp_path / "checkpoint-2") == "optimizer.safetensors does not match its SHA-256 in the manifest"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert restore_run_files(tmp_path, tmp_path / "checkpoint-1") == 1
    assert [c.name for c in checkpoints(tmp_path)] == ["checkpoint-1"]
