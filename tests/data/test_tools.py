"""Tool-calling conversations: validation (FILE:LINE errors), the mask through a template's own tool
support (calls trained, results not), lint, and a run from the CLI."""

import json

import pytest

from deltatune.cli import main
from deltatune.data.examples import IGNORE_INDEX, tokenize_conversation
from deltatune.data.formats import load_records
from deltatune.data.lint import lint
from deltatune.data.templates import BUILT_IN
from deltatune.errors import UserError

from conftest import make_tokenizer, write_jsonl

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def call(arguments='{"city": "Oslo"}', name="get_weather"):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_record(arguments='{"city": "Oslo"}', name="get_weather", tools=(WEATHER,)):
    record = {"messages": [{"role": "user", "content": "weather in Oslo?"},
                           {"role": "assistant", "content": None, "tool_calls": [call(arguments, name)]},
                           {"role": "tool", "content": '{"temp": 3}'},
                           {"role": "assistant", "content": "It is 3 degrees."}]}
    if tools:
        record["tools"] = list(tools)
    return record


def trained_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


def test_calls_are_trained_and_results_are_not(tmp_path):
    tokenizer = make_tokenizer(BUILT_IN["qwen3"].jinja)
    record = load_records(write_jsonl(tmp_path / "t.jsonl", [tool_record()]))[0][0]
    assert record.tools == [WEATHER]
    assert record.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # parsed from JSON text
    # Qwen3 gives the last assistant turn an (empty) think block and drops it once the turn is history, so each
    # turn trains as generated: the call, then the answer after the tool's result.
    call, answer = tokenize_conversation(tokenizer, record.messages, tools=record.tools)
    assert trained_text(tokenizer, call) == ('<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", '
                                             '"arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>')
    assert trained_text(tokenizer, answer) == "<think>\n\n</think>\n\nIt is 3 degrees.<|im_end|>"
    seen = tokenizer.decode(answer.input_ids)
    assert "<tools>" in seen and '{"temp": 3}' in seen and "</tool_call>" in seen


def test_arguments_as_a_json_string_or_an_object_render_alike(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [tool_record(), tool_record(arguments={"city": "Oslo"})])
    a, b = load_records(path)[0]
    assert a.messages == b.messages


@pytest.mark.parametrize("record, message", [
    (tool_record(arguments='{"city": Oslo}'), "field 'messages[1].tool_calls[0].arguments' is not JSON"),
    (tool_record(name="get_time"), "field 'messages[1].tool_calls[0]' calls tool 'get_time', which is not defined "
                                   "(the record's tools are get_weather"),
    (tool_record(tools=()), "calls tool 'get_weather', which is not defined (the record has no 'tools'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "3"},
                   {"role": "assistant", "content": "ok"}]},
     "field 'messages[1]' is a tool result with no tool call before it"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}], "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}, "field 'tools[0]' must be"),
    (tool_record(arguments="[1, 2]"), "field 'messages[1].tool_calls[0].arguments' must be a JSON object"),
])
def test_malformed_tool_data_is_a_file_line_error(tmp_path, record, message):
    path = write_jsonl(tmp_path / "t.jsonl", [tool_record(), record])
    with pytest.raises(UserError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value), err.value


def test_a_template_without_tool_support_is_refused_not_mis_trained(tmp_path, tiny_tokenizer):
    record = load_records(write_jsonl(tmp_path / "t.jsonl", [tool_record()]))[0][0]
    with pytest.raises(UserError, match="does not render tool calls"):
        tokenize_conversation(tiny_tokenizer, record.messages, source=record.source, tools=record.tools)


def test_lint_shows_a_tool_conversations_mask(tmp_path):
    tokenizer = make_tokenizer(BUILT_IN["qwen3"].jinja)
    path = write_jsonl(tmp_path / "t.jsonl", [tool_record()] * 2)
    report = lint(str(path), tokenizer, max_seq_length=1024)
    assert report["errors"] == []
    assert report["roles"] == {"user": 2, "assistant": 4, "tool": 2}
    assert report["example"]["plain"].endswith(
        '<|im_start|>assistant\n[[<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Oslo"}}\n</tool_call><|im_end|>]]\n')
    assert report["example_turns"][0]["plain"].endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
        '<|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>\n'
        '<|im_start|>assistant\n[[<think>\n\n</think>\n\nIt is 3 degrees.<|im_end|>]]\n')


def test_tool_conversations_train_from_the_cli(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [tool_record()] * 8)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\nchat_template: qwen3\ntrain_file: train.jsonl\nmax_steps: 2\n"
                      "per_device_train_batch_size: 4\nlearning_rate: 1.0e-3\nlogging_steps: 1\nbf16: false\n"
                      "report_to: none\ndelta_report: false\nmetric: none\noutput_dir: out\n")
    assert main(["train", str(config)]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"event"' not in line]
    assert len(losses) == 2 and losses[1] < losses[0]
