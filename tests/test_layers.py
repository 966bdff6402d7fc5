"""Layering and size rules of the package, checked by scripts/check_layers.py from the sources alone (pure ast)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_layers", REPO / "scripts" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


check_layers = _load_checker()


@pytest.fixture(scope="module")
def report():
    return check_layers.collect_findings(REPO)


def _explain(report, key: str) -> str:
    items = report.findings[key]
    head = f"{check_layers.RULES[key]}: {report.summary.get(key, len(items))}"
    return "\n".join([head, *(f"  {item}" for item in items)])


@pytest.mark.parametrize("key", list(check_layers.RULES))
def test_rule_holds(report, key):
    assert not report.findings[key], _explain(report, key)


# --- the checker itself catches violations (so a green run above is not vacuous) ---

CLEAN = {
    "__init__.py": '"""Fake package."""\n',
    "__main__.py": "from deltatune.cli import main\n\nmain()\n",
    "errors.py": "class FakeError(Exception):\n    pass\n",
    "config.py": """
        from pydantic import BaseModel

        from deltatune.errors import FakeError


        class ModelArgs(BaseModel):
            name: str = "m"
            size: int = 1


        class RunConfig(BaseModel):
            model: ModelArgs = ModelArgs()
            task: str = "sft"
        """,
    "data/__init__.py": "",
    "data/a.py": "from deltatune.data import b\n\n\ndef helper():\n    return b.value()\n",
    "data/b.py": "def value():\n    return 1\n",
    "model/__init__.py": "",
    "model/x.py": "from deltatune.data.a import helper\n\n\ndef build(cfg):\n    return helper()\n",
    "train/__init__.py": "",
    "train/loop.py": """
        from deltatune.model.x import build


        def fit(cfg):
            model = build(cfg)
            for step in range(3):
                model = step
            return model
        """,
    "tasks.py": """
        def is_text(cfg):
            return cfg.task == "text"
        """,
    "pipeline.py": """
        from deltatune.tasks import is_text
        from deltatune.train.loop import fit


        def run(cfg):
            return fit(cfg) if is_text(cfg) else None
        """,
    "cli.py": """
        def build_parser():
            return None


        def main():
            from deltatune.pipeline import run

            return run(None)
        """,
}

LONG_BODY = "".join(f"    x{i} = {i}\n" for i in range(59))

VIOLATIONS = {
    # cycle a -> b -> a, the back edge through a function-local import
    "data/b.py": "def value():\n    from deltatune.data import a\n\n    return a\n",
    # upward: data (1) imports pipeline (7); private name across modules; a task branch; a 61-line function
    "data/a.py": textwrap.dedent("""
        from deltatune.data import b
        from deltatune.pipeline import run


        def helper():
            return b.value(), run


        def _private():
            return 0


        """) + "def long_one():\n" + LONG_BODY + "    return 0\n",
    "model/x.py": """
        from deltatune.data import a
        from deltatune.data.a import _private, helper


        def build(cfg):
            if cfg.task == "text":
                return a._private()
            return helper(), _private()
        """,
}


def _write_tree(root: Path, files: dict[str, str], tests: dict[str, str] | None = None) -> Path:
    for rel, text in files.items():
        path = root / "src" / "deltatune" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    for rel, text in (tests or {}).items():
        path = root / "tests" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def test_checker_passes_a_clean_tree(tmp_path):
    found = check_layers.collect_findings(_write_tree(tmp_path, CLEAN))
    assert not found.failed, "\n".join(found.lines())
    assert found.summary["config_groups"].startswith("1, largest ModelArgs 2 fields")


def test_checker_catches_violations(tmp_path):
    tests = {"test_fake.py": "from deltatune.data import a\n\n\ndef test_it():\n    assert a._private() == 0\n"}
    found = check_layers.collect_findings(_write_tree(tmp_path, {**CLEAN, **VIOLATIONS}, tests))
    text = {key: "\n".join(map(str, items)) for key, items in found.findings.items()}
    assert found.failed

    assert len(found.findings["cycles"]) == 1, text["cycles"]
    assert "deltatune.data.a" in text["cycles"] and "deltatune.data.b" in text["cycles"]
    assert "in value()" in text["cycles"]

    assert "src/deltatune/data/b.py:2  imports deltatune.data.a in value()" in text["local_imports"]
    assert "deltatune.data.a (data, level 1) imports higher deltatune.pipeline" in text["upward"]
    assert "src/deltatune/model/x.py:2  imports private _private from deltatune.data.a" in text["private_names"]
    assert "uses private deltatune.data.a._private" in text["private_names"]
    assert "tests/test_fake.py:5  uses private deltatune.data.a._private" in text["private_names_tests"]
    assert "src/deltatune/model/x.py:6  compares cfg.task == 'text'" in text["task_branches"]
    assert "long_one: 61 lines (limit 60)" in text["long_functions"]
    # nothing else fires: build_parser is exempt, tasks.py may branch on the task, cli may import locally
    assert {key for key, items in found.findings.items() if items} == {
        "cycles", "upward", "local_imports", "private_names", "private_names_tests", "task_branches",
        "long_functions"}


def test_checker_catches_layer_edges(tmp_path):
    files = {
        **CLEAN,
        "delta/__init__.py": "",
        "delta/m.py": "from deltatune.train import loop\n",  # sibling of train
        "docs/__init__.py": "",
        "docs/d.py": "from deltatune.model import x\n",  # allowed: docs may import model
        "evaluate/__init__.py": "",
        "evaluate/e.py": "from deltatune.docs import d\n",  # only cli may import docs
        "demo/__init__.py": "",
        "demo/o.py": "from deltatune import errors\n",  # demo imports nothing of ours
        "errors.py": "from typing import TYPE_CHECKING\n\n" + CLEAN["errors.py"]
        + "\n\nif TYPE_CHECKING:\n    from deltatune import config\n",
        "speed.py": "",
    }
    found = check_layers.collect_findings(_write_tree(tmp_path, files))
    upward = "\n".join(map(str, found.findings["upward"]))
    assert "deltatune.delta.m (delta, level 5) imports sibling deltatune.train.loop" in upward
    assert "only cli may import docs" in upward
    assert "deltatune.demo.o (demo, level demo) imports higher deltatune.errors" in upward
    assert "deltatune.errors (errors, level 0) imports higher deltatune.config" in upward
    assert "[TYPE_CHECKING]" in upward
    assert "docs/d.py" not in upward
    assert len(found.findings["upward"]) == 4, upward
    assert [f.what for f in found.findings["unlayered"]] == ["deltatune.speed is not part of the layout"]
    assert found.findings["unresolved"] == []
    # errors -> config (TYPE_CHECKING) and config -> errors make a cycle too
    assert "deltatune.config" in "\n".join(map(str, found.findings["cycles"]))


def test_checker_reports_missing_targets_and_sizes(tmp_path):
    files = {key: text for key, text in CLEAN.items() if key not in {"train/loop.py", "pipeline.py"}}
    files["config.py"] = "from pydantic import BaseModel\n\n\nclass RunConfig(BaseModel):\n    a: int = 1\n"
    files["data/big.py"] = "x = 1\n" * 501
    files["data/c.py"] = "from deltatune.data.gone import thing\nfrom deltatune.data.b import nothing\n"
    found = check_layers.collect_findings(_write_tree(tmp_path, files))
    assert found.summary["fit"].startswith("missing") and found.findings["fit"]
    assert found.summary["pipeline_run"].startswith("missing") and found.findings["pipeline_run"]
    assert found.summary["config_groups"].startswith("0") and found.findings["config_groups"]
    assert [f.what for f in found.findings["long_modules"]] == ["501 lines (limit 500)"]
    assert [str(f) for f in found.findings["unresolved"]] == [
        "src/deltatune/cli.py:6  deltatune.pipeline does not exist",
        "src/deltatune/data/c.py:1  deltatune.data.gone does not exist",
        "src/deltatune/data/c.py:2  deltatune.data.b has no name nothing"]


def test_checker_measures_fit_and_its_loop(tmp_path):
    body = "".join(f"        x = {i}\n" for i in range(55))
    files = {**CLEAN, "train/loop.py": "def fit(cfg):\n    while cfg:\n" + body + "    return cfg\n"}
    found = check_layers.collect_findings(_write_tree(tmp_path, files))
    assert found.summary["fit"] == "58 lines (limit 100), loop body 56 (limit 50)"
    assert [f.what for f in found.findings["fit"]] == ["main loop: 56 lines (limit 50)"]
