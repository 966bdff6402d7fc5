"""The bad-input corpus (tests/e2e/bad_inputs/manifest.yaml) through the CLI: exit 2, one line, nothing written."""

import json
import pickle
import shutil
from pathlib import Path

import yaml

from deltatune.cli import main

from conftest import run_cli

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "manifest.yaml").read_text(encoding="utf-8"))


# --- models and checkpoints derived from the tiny test model -----------------------------------

def _copy(tiny, tmp):
    folder = tmp / "model"
    shutil.copytree(tiny, folder)
    return folder


def _truncated_safetensors(tiny, tmp):
    folder = _copy(tiny, tmp)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"model": folder}


def _html_page_as_safetensors(tiny, tmp):
    folder = _copy(tiny, tmp)
    (folder / "model.safetensors").write_text("<!DOCTYPE html><html><body>Rate limit exceeded</body></html>")
    return {"model": folder}


def _text_file_named_gguf(tiny, tmp):
    (tmp / "weights.gguf").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    return {"model": tmp / "weights.gguf"}


def _truncated_gguf(tiny, tmp):
    # The magic and version of a GGUF v3 header, then the download stopped.
    (tmp / "header-only.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(12))
    return {"model": tmp / "header-only.gguf"}


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _pickle_weights_only(tiny, tmp):
    folder = _copy(tiny, tmp)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp / "pwned")))
    return {"model": folder}


def _tokenizer_without_template_or_eos(tiny, tmp):
    folder = _copy(tiny, tmp)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("chat_template", "eos_token", "pad_token"):
        settings.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return {"model": folder}


def _config_json_not_json(tiny, tmp):
    folder = _copy(tiny, tmp)
    (folder / "config.json").write_text('{"model_type": "llama",')
    return {"model": folder}


def _folder_without_config_json(tiny, tmp):
    folder = _copy(tiny, tmp)
    (folder / "config.json").unlink()
    return {"model": folder}


def _remote_code_not_trusted(tiny, tmp):
    folder = _copy(tiny, tmp)
    settings = json.loads((folder / "config.json").read_text())
    settings["model_type"] = "tiny-custom"  # an architecture transformers does not know
    settings["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (folder / "config.json").write_text(json.dumps(settings))
    (folder / "custom.py").write_text(f"open({str(tmp / 'pwned')!r}, 'w').close()\n")
    return {"model": folder}


def _damaged_checkpoint(tiny, tmp):
    ckpt = tmp / "old-run" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "trainable.safetensors").write_bytes(b"bit rot")
    manifest = {"step": 3, "files": {"trainable.safetensors": {"bytes": 7, "sha256": "0" * 64}}}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return {"resume_from_checkpoint": ckpt}


BUILD = {name[1:]: fn for name, fn in globals().items() if name.startswith("_") and callable(fn)
         and name[1:] in {c.get("build") for c in CASES}}


def test_corpus_is_large_and_covers_the_issue():
    assert len(CASES) >= 40 and len({c["case"] for c in CASES}) == len(CASES)
    assert {c["build"] for c in CASES if "build" in c} == set(BUILD)
    names = " ".join(c["case"] for c in CASES)
    for topic in ("invalid_json", "not_object", "missing", "role", "empty_assistant", "whitespace", "ends_with",
                  "non_utf8", "bom", "crlf", "zero_bytes", "directory", "unknown_key", "negative_learning_rate",
                  "batch_size_zero", "classification_for_sft", "truncated_safetensors", "gguf",
                  "tokenizer_without_template", "too_long_everywhere"):
        assert topic in names, topic


def test_every_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    failures = []
    for case in CASES:
        work = tmp_path / case["case"]
        work.mkdir()
        out = work / "out"
        settings = {"model": str(tiny_model_dir), "train_file": str(CORPUS / "data" / "good.jsonl"),
                    "output_dir": str(out), "max_steps": 1, "bf16": False, "metric": "none"}
        if "data" in case:
            settings["train_file"] = str(CORPUS / case["data"])
        for key, value in case.get("set", {}).items():
            settings[key] = str(CORPUS / value) if key.endswith("_file") else value
        if "build" in case:
            settings.update({k: str(v) for k, v in BUILD[case["build"]](tiny_model_dir, work).items()})
        if "config" in case:  # the corpus config file itself; only where the output goes is added
            argv = ["train", str(CORPUS / case["config"]), f"output_dir={out}", f"model={tiny_model_dir}"]
        else:
            config = work / "run.yaml"
            config.write_text(yaml.safe_dump(settings))
            argv = ["train", str(config)]
        rc = main(argv + case.get("args", []))
        err = capsys.readouterr().err
        problems = []
        if rc != 2:
            problems.append(f"exit {rc}")
        if err.count("\n") != 1 or not err.startswith("error: ") or "Traceback" in err:
            problems.append("not one error line")
        if case["expect"] not in err:
            problems.append(f"expected {case['expect']!r}")
        if out.exists():
            problems.append("output_dir was created")
        if (work / "pwned").exists():
            problems.append("planted code ran")
        if problems:
            failures.append(f"{case['case']}: {', '.join(problems)}; stderr: {err.strip()!r}")
    assert not failures, "\n".join(failures)
    assert not (CORPUS / "configs" / "out").exists()  # configs' relative output_dir never used


def test_bad_input_through_a_real_process(tmp_path):
    """The same contract at the process level: exit status 2, stderr one line, no traceback."""
    proc = run_cli("train", str(CORPUS / "configs" / "unknown_key_typo.yaml"), f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "did you mean 'learning_rate'" in proc.stderr and not (tmp_path / "out").exists()


# --- safe loading: planted code never runs unless asked ----------------------------------------

def test_planted_code_next_to_safetensors_is_never_run(tmp_path, tiny_model_dir, capsys):
    """A folder with safetensors plus a pickle payload and an auto_map to its own Python file trains
    from the safetensors with built-in code: neither the pickle nor the Python file runs."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    settings = json.loads((folder / "config.json").read_text())
    settings["auto_map"] = {"AutoModelForCausalLM": "custom.Model"}
    (folder / "config.json").write_text(json.dumps(settings))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "cfg").mkdir()
    shutil.copy(CORPUS / "data" / "good.jsonl", tmp_path / "cfg" / "train.jsonl")
    config = tmp_path / "cfg" / "run.yaml"
    # Relative paths, resolved against the config's folder (the test runs from elsewhere).
    config.write_text("model: ../model\ntrain_file: train.jsonl\noutput_dir: out\nmax_steps: 1\nbf16: false\n"
                      "metric: none\nvalidation_split: 0\n")
    assert main(["train", str(config)]) == 0, capsys.readouterr().err
    assert (tmp_path / "cfg" / "out" / "final" / "model.safetensors").is_file()
    assert not marker.exists()
