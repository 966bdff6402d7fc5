"""Every input format becomes the same conversation; bad records name file, line and field."""

import json

import pytest

from deltatune.data.formats import load_records
from deltatune.errors import UserError

from conftest import write_jsonl

EXPECTED = [{"role": "user", "content": "Add 2 and 2"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("record,fmt", [
    ({"messages": EXPECTED}, "messages"),
    ({"conversations": [{"from": "human", "value": "Add 2 and 2"}, {"from": "gpt", "value": "4"}]}, "sharegpt"),
    ({"instruction": "Add 2 and 2", "input": "", "output": "4"}, "alpaca"),
    ({"prompt": "Add 2 and 2", "completion": "4"}, "prompt_completion"),
])
def test_chat_formats_normalise_to_messages(tmp_path, record, fmt):
    records, detected = load_records(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert detected == fmt
    assert records[0].messages == EXPECTED
    assert records[0].source.endswith("d.jsonl:1")


def test_alpaca_input_is_appended_to_instruction(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "chat", "output": "cat"}])
    assert load_records(path)[0][0].messages[0]["content"] == "Translate\n\nchat"


def test_text_and_classification_records(tmp_path):
    recs, fmt = load_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "some words"}]))
    assert fmt == "text" and recs[0].text == "some words"
    recs, fmt = load_records(write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": 1}]))
    assert fmt == "classification" and recs[0].label == "1"


def test_json_array_and_csv(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "Add 2 and 2", "completion": "4"}] * 2, indent=1))
    recs, _ = load_records(tmp_path / "d.json")
    assert len(recs) == 2 and recs[1].messages == EXPECTED and recs[1].source.endswith(":6")
    (tmp_path / "d.csv").write_text('prompt,completion\n"Add 2 and 2",4\r\n"Add 2 and 2",4\r\n')
    recs, fmt = load_records(tmp_path / "d.csv")
    assert fmt == "prompt_completion" and recs[1].messages == EXPECTED and recs[1].source.endswith("d.csv:3")


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"messages": EXPECTED}) + "\r\n").encode() * 2)
    assert len(load_records(path)[0]) == 2


@pytest.mark.parametrize("lines,message", [
    (['{"messages": []}'], "d.jsonl:1: field 'messages' is an empty list"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b"'], "d.jsonl:2: invalid JSON"),
    (['{"messages": [{"role": "bot", "content": "x"}]}'], "d.jsonl:1: field 'messages[0].role' is 'bot'"),
    (['{"messages": [{"role": "user", "content": 3}]}'], "field 'messages[0].content' must be a string"),
    (['{"messages": [{"role": "user", "content": "q"}]}'], "has no assistant turn"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
      '{"role": "user", "content": "q2"}]}'], "does not end with an assistant turn"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}'],
     "empty assistant response"),
    (['{"prompt": "a"}'], "cannot tell the format"),
    (['{"instruction": "a", "output": ""}'], "field 'output' is empty"),
    (['[1, 2]'], "expected a JSON object"),
])
def test_bad_records_name_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_records(path)


def test_non_utf8_empty_and_directory(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: bytes that are not UTF-8"):
        load_records(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="file is empty"):
        load_records(empty)
    with pytest.raises(UserError, match="is a directory"):
        load_records(tmp_path)
