"""Where users already watch their runs: TensorBoard, MLflow, Weights & Biases, trackio (`report_to`).

Every tracker gets the same four things, under the same names: the resolved config as
parameters (each key under its own name, flat as in YAML), every scalar of `metrics.jsonl`
with its step (`loss`, `learning_rate`, `grad_norm`, `tokens_per_second`, `eval_loss`, ...),
event records' numbers as `<event>/<name>` (`base_eval/loss`), the evaluation and
delta-report summary numbers at the end (`base/<name>`, `tuned/<name>`, `delta/<name>`), and
the report files as artifacts where the tracker stores files. A run is named after its
`output_dir`. Only the config is sent: no environment variable, token or
secret is ever logged. Each tracker is the library's own client (optional extras:
`pip install 'deltatune[mlflow]'` and so on), imported only when asked for; MLflow and W&B are
pointed where their own environment variables say (`MLFLOW_TRACKING_URI`, `WANDB_MODE`, ...).

A resumed run continues the same tracker run where the tracker can (MLflow by run id, W&B by
id, trackio by name): the ids are kept in `output_dir/trackers.json`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from deltatune.errors import UserError

PROJECT = "deltatune"
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}  # report_to name -> import name
IDS_FILE = "trackers.json"


def check_available(names: list[str]) -> None:
    """Every asked-for tracker's library is installed (before anything loads)."""
    for name in names:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name]) is None:
            raise UserError(f"report_to: {name} needs the {name} package "
                            f"(pip install 'deltatune[{name}]', or drop {name} from report_to)")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, under their own names (the step apart); an event's
    under `event/name` (`base_eval/loss`), so they never join the training curves."""
    prefix = f"{record['event']}/" if "event" in record else ""
    return {prefix + k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def params(config: dict) -> dict[str, str | int | float | bool]:
    """The flat config as tracker parameters: lists and None as text."""
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in config.items()}


class TensorBoard:
    def __init__(self, out_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard hides what the killed run logged after the checkpoint.
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, values: dict[str, float], step: int) -> None:
        self.log(values, step)

    def artifacts(self, paths: list[Path]) -> None:
        pass  # TensorBoard keeps no files; the report sits beside its event files

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, out_dir: Path, run_name: str, config: dict, run_id: str | None):
        import mlflow

        self.mlflow = mlflow
        if run_id is None:
            mlflow.set_experiment(PROJECT)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        self.id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params(params(config))

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def summary(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.mlflow.log_artifact(str(path))

    def close(self) -> None:
        self.mlflow.end_run()


class WandB:
    def __init__(self, out_dir: Path, run_name: str, config: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(project=PROJECT, name=run_name, dir=str(out_dir), config=params(config),
                              id=run_id, resume="allow" if run_id else None)
        self.id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def artifacts(self, paths: list[Path]) -> None:
        import wandb

        artifact = wandb.Artifact(f"{self.run.name}-report", type="report")
        for path in paths:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, out_dir: Path, run_name: str, config: dict, run_id: str | None):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=PROJECT, name=run_name, config=params(config),
                                resume="allow" if run_id else "never", embed=False, auto_log_gpu=False,
                                auto_log_cpu=False)
        self.id = run_name

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def summary(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.trackio.log_artifact(str(path), name=path.name.replace(".", "-"), type="report")

    def close(self) -> None:
        self.trackio.finish()


def open_trackers(names: list[str], out_dir: Path, config: dict, resuming: bool,
                  purge_step: int | None = None) -> list:
    """The asked-for trackers, started (or, resuming, continued) for this run."""
    ids_path = out_dir / IDS_FILE
    saved = json.loads(ids_path.read_text(encoding="utf-8")) if resuming and ids_path.is_file() else {}
    run_name = Path(config.get("output_dir") or out_dir).name
    opened, ids = [], {}
    for name in names:
        if name == "tensorboard":
            opened.append(TensorBoard(out_dir, purge_step))
            continue
        kind = {"mlflow": MLflow, "wandb": WandB, "trackio": Trackio}.get(name)
        if kind is not None:
            tracker = kind(out_dir, run_name, config, saved.get(name))
            ids[name] = tracker.id
            opened.append(tracker)
    if ids:
        ids_path.write_text(json.dumps(ids, indent=1) + "\n", encoding="utf-8")
    return opened
