"""What a run logs: `metrics.jsonl` (one JSON object per event) and TensorBoard scalars.

Only rank 0 writes; the other ranks of a torchrun job get a `NullLog` that takes the same
calls and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from deltatune.files import writing
from deltatune.train.checkpoint import resume_hint


class MetricsLog:
    """metrics.jsonl (one object per logged event) plus TensorBoard scalars."""

    def __init__(self, out_dir: Path, purge_step: int | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard hides what the killed run logged after the checkpoint.
        self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        with writing("metrics.jsonl", self.path.parent, hint=lambda: resume_hint(self.path.parent)):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


class NullLog:
    """The metrics log of ranks other than 0: they compute the same numbers and write nothing."""

    path = None  # no metrics.jsonl to copy into a checkpoint

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
