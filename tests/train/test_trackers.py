"""report_to: every tracker reads the same run in its own format, through its own client, offline.

MLflow with a local SQLite store read back through MlflowClient; W&B in offline mode, read from
its run folder's summary and config files; trackio's local store read back through its own API.
"""

import json
import os

import pytest

from deltatune.cli import main

from conftest import chat, write_jsonl

SECRET = "sk-do-not-log-0123456789"


def wandb_offline_run(path):
    """(config, {step: history row}, summary) of an offline W&B run, read from its transaction log
    (`run-*.wandb`: W&B's record log in 32 KB blocks, each record a W&B protobuf) with W&B's own schema."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, pending, block = path.read_bytes(), 7, b"", 32768  # 7: the file header (":W&B", magic, version)
    config, history, summary = {}, {}, {}
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += room
            continue
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 whole, 2 first, 3 middle, 4 last part
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        which = record.WhichOneof("record_type")
        if which == "run":
            for item in record.run.config.update:
                value = json.loads(item.value_json)
                config[item.key] = value["value"] if isinstance(value, dict) and "value" in value else value
        elif which == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[row["_step"]] = row
        elif which == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    return config, history, summary


def run_yaml(tmp_path, model_dir, trackers: str):
    write_jsonl(tmp_path / "train.jsonl", [chat(f"say {w}", f"{w} {w}") for w in ["fox", "dog", "cat", "sun"] * 5])
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ntrain_file: train.jsonl\noutput_dir: out\nmax_steps: 6\n"
                      "per_device_train_batch_size: 4\nlearning_rate: 5.0e-3\nlogging_steps: 1\nbf16: false\n"
                      "metric: none\nvalidation_split: 0.2\neval_steps: 3\nkl_samples: 0\nside_by_side_prompts: 0\n"
                      f"report_to: {trackers}\n")
    return config


def test_mlflow_wandb_and_trackio_each_hold_the_run(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # secrets in the environment never reach a tracker
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["train", str(run_yaml(tmp_path, tiny_model_dir, "[tensorboard, mlflow, wandb, trackio]"))]) == 0
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and sorted(evals) == [3, 6]
    delta = json.loads((out / "delta.json").read_text())
    gain = delta["task"]["validation"]["loss"]["gain"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("deltatune").experiment_id])
    assert run.info.run_name == "out" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.005" and run.data.params["method"] == "full"
    assert run.data.params["report_to"] == json.dumps(["tensorboard", "mlflow", "wandb", "trackio"])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(losses)
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")} == pytest.approx(evals)
    assert run.data.metrics["delta/task/validation/loss/gain"] == pytest.approx(gain)
    assert "tuned/loss" in run.data.metrics and "base/loss" in run.data.metrics
    assert run.data.metrics["base_eval/loss"] == pytest.approx(next(r["loss"] for r in rows if r.get("event") ==
                                                                    "base_eval"))
    assert {"report.md", "report.html", "delta.json", "summary.md"} <= {a.path for a in client.list_artifacts(
        run.info.run_id)}
    assert SECRET not in json.dumps(run.data.params)

    (folder,) = (out / "wandb").glob("offline-run-*")
    config, history, summary = wandb_offline_run(next(folder.glob("run-*.wandb")))
    assert config["learning_rate"] == 0.005 and config["method"] == "full" and SECRET not in json.dumps(config)
    assert {step: row["loss"] for step, row in history.items() if "loss" in row} == pytest.approx(losses)
    assert summary["loss"] == pytest.approx(losses[6])
    assert summary["delta/task/validation/loss/gain"] == pytest.approx(gain) and "tuned/loss" in summary

    import trackio
    from trackio import SQLiteStorage

    (trun,) = list(trackio.Api().runs("deltatune"))
    assert trun.name == "out" and trun.config["learning_rate"] == 0.005 and SECRET not in json.dumps(trun.config)
    logged = {r["step"]: r["loss"] for r in SQLiteStorage.get_logs("deltatune", "out") if "loss" in r}
    assert logged == pytest.approx(losses)
    assert json.loads((out / "trackers.json").read_text()).keys() == {"mlflow", "wandb", "trackio"}


def test_a_missing_tracker_is_one_line_naming_the_extra_before_anything_loads(tmp_path, tiny_model_dir, monkeypatch,
                                                                              capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(run_yaml(tmp_path, tiny_model_dir, "mlflow"))]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "report_to: mlflow needs the mlflow package" in captured.err
    assert "pip install 'deltatune[mlflow]'" in captured.err and "method:" not in captured.out
    assert not (tmp_path / "out").exists()


def test_report_to_takes_one_name_a_list_or_none(tmp_path):
    from deltatune.config import build_config
    from deltatune.errors import UserError

    def report_to(value):
        return build_config({"train_file": "t", "report_to": value}, "run.yaml").output.report_to
    assert report_to("wandb") == ["wandb"] and report_to(["mlflow", "trackio"]) == ["mlflow", "trackio"]
    assert report_to("none") == [] and build_config({"train_file": "t"}, "x").output.report_to == ["tensorboard"]
    with pytest.raises(UserError, match="report_to"):
        report_to("comet")
    with pytest.raises(UserError, match="none goes alone"):
        report_to(["none", "wandb"])
