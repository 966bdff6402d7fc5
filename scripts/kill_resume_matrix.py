"""Kill a tiny CPU run at many points, resume it, and print whether it ends bit-identical.

    PYTHONPATH=src python scripts/kill_resume_matrix.py [--nproc 2 [--parallelism fsdp]] [POINT ...]

POINT is what DELTATUNE_TEST_KILL takes: step:N (SIGKILL after step N, before its checkpoint),
checkpoint-write:N (SIGKILL with checkpoint-N's files written, not yet renamed into place),
checkpoint-renamed:N (after the rename, before pruning), optionally :SIGTERM / :SIGINT.
Each point is an independent run: one kill, one `--resume`, compared with an uninterrupted run.
With `--nproc 2` every run (the reference too) is `deltatune train --nproc 2` (torchrun, gloo):
the kill point fires in every rank that reaches it (checkpoint-write and checkpoint-renamed only
in rank 0, which writes), and torchrun stops the others.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "e2e")]

from test_resume import logged, make_run  # noqa: E402

from conftest import make_tiny_llama, make_tokenizer  # noqa: E402

DEFAULT_POINTS_NPROC = ["step:1", "step:4", "checkpoint-write:6", "checkpoint-renamed:9", "step:5:SIGTERM"]
DEFAULT_POINTS = ["step:1", "step:3", "step:4", "step:7", "step:12", "checkpoint-write:3", "checkpoint-write:9",
                  "checkpoint-renamed:6", "step:5:SIGTERM", "step:8:SIGINT"]


def train(config, *extra, kill=None, launch=(), overrides=()):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DELTATUNE_TEST_KILL", None)
    if kill:
        env["DELTATUNE_TEST_KILL"] = kill
    return subprocess.run([sys.executable, "-m", "deltatune", "train", *launch, str(config), *overrides, *extra],
                          env=env, capture_output=True, text=True, timeout=600).returncode


def main(points, launch=(), overrides=()):
    from safetensors.torch import load_file

    root = Path(tempfile.mkdtemp(prefix="kill-matrix-"))
    tokenizer = make_tokenizer()
    make_tiny_llama(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    reference = make_run(root / "reference", root / "model")
    assert train(reference, launch=launch, overrides=overrides) == 0
    want = load_file(root / "reference" / "out" / "final" / "model.safetensors")
    print(f"{'kill point':24} {'exit':>5} {'resumed':>8} {'weights':>14} {'metrics':>10}")
    for point in points:
        config = make_run(root / point.replace(":", "_"), root / "model")
        rc = train(config, kill=point, launch=launch, overrides=overrides)
        resumed = train(config, "--resume", launch=launch, overrides=overrides)
        out = config.parent / "out"
        got = load_file(out / "final" / "model.safetensors") if resumed == 0 else {}
        same = bool(got) and got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
        log_same = resumed == 0 and logged(out) == logged(root / "reference" / "out")
        print(f"{point:24} {rc:>5} {resumed:>8} {'bit-identical' if same else 'DIFFERENT':>14} "
              f"{'identical' if log_same else 'DIFFERENT':>10}", flush=True)
    shutil.rmtree(root)


if __name__ == "__main__":
    args, launch, overrides = sys.argv[1:], [], []
    if "--nproc" in args:
        i = args.index("--nproc")
        launch, args = ["--nproc", args[i + 1]], args[:i] + args[i + 2:]
    if "--parallelism" in args:
        i = args.index("--parallelism")
        overrides, args = [f"parallelism={args[i + 1]}"], args[:i] + args[i + 2:]
    main(args or (DEFAULT_POINTS_NPROC if launch else DEFAULT_POINTS), launch, overrides)
