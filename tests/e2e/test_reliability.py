"""Two runs, one folder; a full disk; a read-only folder: one line, exit 2, no lost checkpoint.

Real where the machine allows: two processes race on one folder, a holder is killed with -9,
the disk fills up on a small tmpfs and a folder is mounted read-only when the tests run as root
(CI does); elsewhere the same write points fail through the DELTATUNE_TEST_ENOSPC hook.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.errors import UserError
from deltatune.train.checkpoint import checkpoints, verify

from conftest import SRC, chat, write_jsonl

CONFIG = """model: {model}
train_file: {data}
output_dir: {out}
overwrite_output_dir: true
max_steps: 6
save_steps: 2
per_device_train_batch_size: 4
learning_rate: 5.0e-3
logging_steps: 1
bf16: false
metric: none
delta_report: false
validation_split: 0
"""


def write_run(root, model_dir, out, **extra):
    root.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(root / "train.jsonl", [chat(f"say {w}", f"{w} {w}") for w in ["fox", "dog", "cat", "sun"] * 6])
    config = root / "run.yaml"
    config.write_text(CONFIG.format(model=model_dir, data=data, out=out)
                      + "".join(f"{k}: {v}\n" for k, v in extra.items()))
    return config


def cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "deltatune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw,
                            env={**os.environ, "PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false",
                                 **(env or {})})


def mount(*args) -> bool:
    """A mount of our own (tests run as root in CI); False where this machine does not allow it."""
    if os.geteuid() != 0 or os.environ.get("DELTATUNE_TEST_NO_MOUNT"):
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """(folder, resize(size)) on a tmpfs of its own, or None where none can be mounted."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)):
        yield None
        return

    def resize(size: str) -> None:
        assert mount("-o", f"remount,size={size}", str(folder))
    try:
        yield folder, resize
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_second_run_on_a_busy_folder_stops_before_loading_and_a_killed_holder_frees_it(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    config = write_run(tmp_path, tiny_model_dir, out)
    holder = cli("train", str(config), env={"DELTATUNE_TEST_FAULT": "0:2:hang"})  # holds the folder, then hangs
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or '"step": 1' not in (out / "metrics.jsonl").read_text():
            assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()
            time.sleep(0.2)
        def snapshot():  # TensorBoard's writer thread flushes on its own clock: its files are left out
            return {f.relative_to(out): f.read_bytes() for f in sorted(out.rglob("*"))
                    if f.is_file() and "tensorboard" not in f.parts}
        before = snapshot()  # the holder hangs at step 2: its folder stays as it is
        second = cli("train", str(config))
        stdout, stderr = second.communicate(timeout=120)
        assert snapshot() == before  # the loser wrote nothing
        assert second.returncode == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
        assert f"output_dir '{out}' is in use by another deltatune run (pid {holder.pid} on" in stderr
        assert "method:" not in stdout  # refused before any model was loaded
        log = (out / "metrics.jsonl").read_text()
        assert log.count('"event": "start"') == 1  # the holder's log alone: nothing interleaved
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The kernel dropped the killed holder's lock: the same command now runs, and its files are whole.
    third = cli("train", str(config))
    _, stderr = third.communicate(timeout=300)
    assert third.returncode == 0, stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "start" for r in rows) == 1 and sum("loss" in r for r in rows) == 6
    assert (out / "final" / "model.safetensors").is_file() and [c.name for c in checkpoints(out)] == [
        "checkpoint-2", "checkpoint-4"]


def test_a_full_disk_stops_with_one_line_keeps_the_last_checkpoint_and_resume_ends_bit_identical(
        tmp_path, tiny_model_dir, small_disk, capsys):
    whole = write_run(tmp_path / "whole", tiny_model_dir, tmp_path / "whole" / "out")
    assert main(["train", str(whole)]) == 0
    reference = load_file(tmp_path / "whole" / "out" / "final" / "model.safetensors")
    checkpoint_bytes = sum(f.stat().st_size for f in (tmp_path / "whole" / "out" / "checkpoint-2").iterdir())

    if small_disk is not None:  # a real full disk: room for the first checkpoint, not the second
        disk, resize = small_disk
        resize(f"{(checkpoint_bytes * 3 // 2 + 96 * 1024) // 4096 * 4096}")
        out = disk / "out"
    else:  # no mount here: the second checkpoint's write fails as a full disk fails
        out = tmp_path / "out"
    config = write_run(tmp_path / "run", tiny_model_dir, out)
    if small_disk is None:
        os.environ["DELTATUNE_TEST_ENOSPC"] = "checkpoint:4"
    capsys.readouterr()
    try:
        rc = main(["train", str(config)])
    finally:
        os.environ.pop("DELTATUNE_TEST_ENOSPC", None)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "checkpoint-4: no space left on the device" in err and "free in" in err
    assert "the last checkpoint, checkpoint-2, is intact; free some space and continue with --resume" in err
    assert [c.name for c in checkpoints(out)] == ["checkpoint-2"] and verify(out / "checkpoint-2") is None
    assert not list(out.glob(".checkpoint-*")) and not (out / "final").exists()

    if small_disk is not None:
        small_disk[1]("64m")  # the user frees space
    assert main(["train", str(config), "--resume"]) == 0
    resumed = load_file(out / "final" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all((resumed[k] == reference[k]).all() for k in reference)  # bit for bit


@pytest.mark.parametrize("point,expect", [("final", "final/: no space left on the device"),
                                          ("report", "the delta report: no space left on the device"),
                                          ("checkpoint", "checkpoint-2: no space left on the device")])
def test_every_write_point_turns_a_full_disk_into_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys, point,
                                                           expect):
    config = write_run(tmp_path, tiny_model_dir, tmp_path / "out", delta_report="true", kl_samples=0,
                       side_by_side_prompts=0)
    monkeypatch.setenv("DELTATUNE_TEST_ENOSPC", point)
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err and "Traceback" not in err, err
    assert not list((tmp_path / "out").glob(".*.tmp-*"))  # no temporary folder left behind


def test_the_dataset_cache_and_prepare_out_turn_a_full_disk_into_one_line(tmp_path, tiny_model_dir, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DELTATUNE_TEST_ENOSPC", "cache")
    assert main(["train", str(write_run(tmp_path, tiny_model_dir, tmp_path / "out"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the dataset cache {tmp_path / 'cache' / 'datasets'}: no space left" in err

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Foxes\n\nThe red fox lives in forests and fields. It hunts mice at night and sleeps by day.\n\n"
        "## Dogs\n\nDogs were tamed from wolves long ago. They guard houses and herd sheep for farmers.\n")
    monkeypatch.setenv("DELTATUNE_TEST_ENOSPC", "prepare")
    assert main(["prepare", str(tmp_path / "docs"), "--out", str(tmp_path / "pairs.jsonl"),
                 "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pairs.jsonl: no space left on the device" in err
    assert not (tmp_path / "pairs.jsonl").exists() and not list(tmp_path.glob(".pairs.jsonl*"))


def test_unwritable_places_are_one_line_before_training(tmp_path, tiny_model_dir, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["train", str(write_run(tmp_path / "f", tiny_model_dir, tmp_path / "a_file"))]) == 2
    assert f"output_dir '{tmp_path / 'a_file'}' is a file" in capsys.readouterr().err

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "a_file" / "cache"))
    assert main(["train", str(write_run(tmp_path / "c", tiny_model_dir, tmp_path / "c" / "out"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DELTATUNE_CACHE" in err and "set DELTATUNE_CACHE to a writable folder" in err
    assert not (tmp_path / "c" / "out").exists()
    monkeypatch.delenv("DELTATUNE_CACHE")

    locked = tmp_path / "ro"
    locked.mkdir()
    config = write_run(tmp_path / "r", tiny_model_dir, locked / "out")
    if mount("-o", "bind", str(locked), str(locked)) and mount("-o", "remount,bind,ro", str(locked)):
        try:  # root ignores permissions: a read-only mount is what refuses it
            assert main(["train", str(config)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "the file system is read-only" in err, err
        finally:
            subprocess.run(["umount", "-l", str(locked)], capture_output=True)
    elif os.geteuid() != 0:
        locked.chmod(0o555)
        try:
            assert main(["train", str(config)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "permission denied" in err, err
        finally:
            locked.chmod(0o755)
    else:  # root without mounts: nothing here can refuse a write, so check the mapping itself
        from deltatune.files import writing

        with pytest.raises(UserError, match=r"^out: cannot write /x \(the file system is read-only\); choose"):
            with writing("out", tmp_path):
                raise OSError(errno.EROFS, "Read-only file system", "/x")
