"""Task metrics: exact match, contains, a user's regex and a user's JSON Schema."""

import json

import pytest

from deltatune.config import build_config
from deltatune.errors import UserError
from deltatune.evaluate.metrics import Check, load_check

from conftest import chat, run_cli, write_jsonl


def test_each_check_scores_what_it_says(tmp_path):
    assert Check("exact_match").hits(["  Oslo ", "oslo"], ["Oslo", "Oslo"]) == [1.0, 0.0]
    assert Check("contains").hits(["It is Oslo.", "Lima"], ["Oslo", "Oslo"]) == [1.0, 0.0]
    regex = load_check("regex", r"\w+ \| \d+")
    assert regex.hits(["Maria | 3", "Maria | three", "x Maria | 3 y"], ["", "", ""]) == [1.0, 0.0, 0.0]
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "required": ["qty"], "properties": {"qty": {"type": "integer"}}}))
    check = load_check("json_schema", schema_file=str(schema))
    assert check.hits(['{"qty": 3}', '{"qty": "3"}', "not json", "[]"], [""] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_bad_metric_settings_fail_up_front(tmp_path):
    with pytest.raises(UserError, match="metric_pattern: not a valid regular expression"):
        load_check("regex", "([a-z")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object",\n "properties": 3}')
    with pytest.raises(UserError, match="not a valid JSON Schema"):
        load_check("json_schema", schema_file=str(bad))
    with pytest.raises(UserError, match="metric: regex needs metric_pattern"):
        build_config({"train_file": "t.jsonl", "metric": "regex"}, "test")
    with pytest.raises(UserError, match="metric_schema goes with metric: json_schema"):
        build_config({"train_file": "t.jsonl", "metric_schema": "s.json"}, "test")


def test_eval_cli_with_a_regex_metric(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("say fox", "fox fox"), chat("say dog", "dog dog")])
    out = tmp_path / "e.json"
    proc = run_cli("eval", "--model", str(tiny_model_dir), "--data", str(data), "--metric", "regex",
                   "--metric-pattern", ".*", "--max-new-tokens", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["regex"] == 1.0 and all(p["hit"] for p in result["predictions"])  # ".*" matches anything
    proc = run_cli("eval", "--model", str(tiny_model_dir), "--data", str(data), "--metric", "regex")
    assert proc.returncode == 2 and "needs --metric-pattern" in proc.stderr
