"""What a run logs: `metrics.jsonl` (one JSON object per event), and the same scalars to every
tracker of `report_to` (TensorBoard by default; trackers.py).

Only rank 0 writes; the other ranks of a torchrun job get a `NullLog` that takes the same
calls and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from deltatune.files import writing
from deltatune.train.checkpoint import resume_hint
from deltatune.train.trackers import scalars


class MetricsLog:
    """metrics.jsonl (one object per logged event) plus the trackers' scalars."""

    def __init__(self, out_dir: Path, trackers: list | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self.trackers = trackers or []

    def write(self, record: dict) -> None:
        with writing("metrics.jsonl", self.path.parent, hint=lambda: resume_hint(self.path.parent)):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, record.get("step", 0))

    def summary(self, values: dict[str, float], step: int) -> None:
        """The run's closing numbers (evaluations, the delta report), to every tracker."""
        for tracker in self.trackers:
            tracker.summary(values, step)

    def artifacts(self, paths: list[Path]) -> None:
        for tracker in self.trackers:
            tracker.artifacts([p for p in paths if p.is_file()])

    def close(self) -> None:
        self._file.close()
        for tracker in self.trackers:
            tracker.close()


class NullLog:
    """The metrics log of ranks other than 0: they compute the same numbers and write nothing."""

    path = None  # no metrics.jsonl to copy into a checkpoint

    def write(self, record: dict) -> None:
        pass

    def summary(self, values: dict[str, float], step: int) -> None:
        pass

    def artifacts(self, paths: list[Path]) -> None:
        pass

    def close(self) -> None:
        pass
