"""Read training files and turn every supported format into one canonical record type.

Supported: OpenAI `messages`, ShareGPT `conversations` (from/value), Alpaca
(instruction/input/output), `prompt`/`completion`, raw `text`, `text`/`label`
(+ optional `text_pair`) for classification, and preference pairs: `prompt`/`chosen`/`rejected`
(strings, or a message list and two assistant message lists) or `chosen`/`rejected` alone
(two whole conversations that differ in their last assistant turn only). Files: JSONL, JSON
(an array) and CSV.

Every problem is reported as `FILE:LINE: what is wrong (how to fix)`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from deltatune.data.sources import dataset_rows, is_dataset_source, renamed
from deltatune.data.tools import check_tool_results, read_tool_calls, read_tools
from deltatune.errors import UserError, where

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant"}
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "classification", "preference")
CHAT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")


@dataclass
class Record:
    """One training example, whatever file format it came from."""

    messages: list[dict] = field(default_factory=list)  # [{"role": ..., "content": ...}]
    text: str | None = None
    text_pair: str | None = None
    label: str | None = None
    source: str = ""  # FILE:LINE, for messages about this record
    # A preference pair: `messages` is the prompt, these the two responses (assistant turns) to it.
    chosen: list[dict] | None = None
    rejected: list[dict] | None = None
    tools: list[dict] | None = None  # function definitions the conversation's assistant may call


# --- reading files: each yields (line number, raw object) --------------------------------

def _check_file(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a save_to_disk dataset; expected a data file (.jsonl, .json, "
                        ".csv, .parquet, .arrow)")
    if not path.exists():
        raise UserError(f"{path}: file not found (check the path; relative paths are relative to the config file)")


def _read_text(path: Path) -> str:
    _check_file(path)
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path}: file is empty (add at least one record)")
    try:
        # utf-8-sig: a byte-order mark from a Windows editor is harmless, so accept it.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise UserError(f"{where(path, line)}: bytes that are not UTF-8 at column {column} "
                        "(re-save the file as UTF-8)") from None


def _jsonl_file_items(path: Path, errors: list[str] | None = None):
    """_jsonl_items, reading the file a line at a time (the same errors, the same line numbers)."""
    _check_file(path)
    found = False
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            bom = number == 1 and raw.startswith(codecs.BOM_UTF8)
            try:
                line = raw[3:].decode("utf-8") if bom else raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{where(path, number)}: bytes that are not UTF-8 at column {err.start + 1 + 3 * bom} "
                                "(re-save the file as UTF-8)") from None
            found = found or bool(line.strip())
            yield from _jsonl_items(path, line, errors, first=number)
    if not found:
        raise UserError(f"{path}: file is empty (add at least one record)")


def _jsonl_items(path: Path, text: str, errors: list[str] | None = None, first: int = 1):
    # Split on \n only: splitlines() also splits inside records at U+2028/U+0085, which JSON strings may
    # hold raw, and would shift every line number after them. A CRLF's \r is JSON whitespace.
    for number, line in enumerate(text.split("\n"), start=first):
        if not line.strip():
            continue
        if line.startswith("\ufeff"):  # accepted at the start of the file only (see _read_text)
            raise UserError(f"{where(path, number)}: a byte-order mark (BOM) in the middle of the file, "
                            "often from joining files with cat (delete it, or save the parts as UTF-8 without BOM)")
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            message = (f"{where(path, number)}: invalid JSON ({err.msg} at column {err.colno}); "
                       "each line must hold one JSON object")
            if errors is None:
                raise UserError(message) from None
            errors.append(message)  # lines are independent: report this one and read on


def _json_array_items(path: Path, text: str):
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        # A single object per line is the JSONL convention even when the file says .json.
        yield from _jsonl_items(path, text)
        return
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise UserError(f"{where(path, text.count(chr(10)) + 1)}: JSON array is not closed (add ']')")
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UserError(f"{where(path, err.lineno)}: invalid JSON ({err.msg} at column {err.colno})") from None
        yield line, obj


def _csv_items(path: Path, text: str):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise UserError(f"{where(path, 1)}: CSV has no header row (first line must name the columns)")
    for row in reader:
        if None in row:
            raise UserError(f"{where(path, reader.line_num)}: more values than header columns "
                            "(quote fields with commas)")
        yield reader.line_num, {k: v for k, v in row.items() if v is not None}


def read_raw(path: str | Path, errors: list[str] | None = None, *, columns: dict[str, str] | None = None,
             split: str | None = None, config: str | None = None, role: str = "train"):
    """Yield (line, object) for every record of a JSONL, JSON or CSV file, or (`row N`, object) for every row of a
    parquet/Arrow file, a `save_to_disk` folder or a hub id (`data.sources`); `columns` renames fields.

    With `errors` given (lint), a JSONL line that is not a JSON object is reported there and skipped.
    """
    if is_dataset_source(path):
        items = dataset_rows(path, split, config, role)
    elif Path(path).suffix.lower() in (".jsonl", ".ndjson"):
        items = _jsonl_file_items(Path(path), errors)  # line by line: memory does not grow with the file
    else:
        path = Path(path)
        text = _read_text(path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            items = _csv_items(path, text)
        elif suffix == ".json":
            items = _json_array_items(path, text)
        else:
            raise UserError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv, .parquet, .arrow, "
                            "a save_to_disk folder or hf://owner/name)")
    for line, obj in items:
        if not isinstance(obj, dict):
            message = f"{where(path, line)}: expected a JSON object, got {type(obj).__name__}"
            if errors is None:
                raise UserError(message)
            errors.append(message)
            continue
        yield line, renamed(obj, columns, where(path, line)) if columns else obj


# --- format detection and normalisation ------------------------------------------------------

def detect_format(obj: dict) -> str | None:
    keys = set(obj)
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys and "label" in keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def _need_str(obj: dict, key: str, loc: str, *, label: str | None = None, allow_empty=True) -> str:
    name = label or key
    if key not in obj:
        raise UserError(f"{loc}: missing field '{name}'")
    value = obj[key]
    if not isinstance(value, str):
        raise UserError(f"{loc}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{loc}: field '{name}' is empty (give it text or remove the record)")
    return value


def _check_conversation(messages: list[dict], loc: str, field_name: str) -> None:
    if not messages:
        raise UserError(f"{loc}: field '{field_name}' is an empty list (add user and assistant turns)")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{loc}: field '{field_name}' has no assistant turn (nothing to train on)")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{loc}: field '{field_name}' does not end with an assistant turn "
                        "(end with the response to train on, or drop the trailing turn)")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise UserError(f"{loc}: field '{field_name}[{i}].content' is an empty assistant response "
                            "(write the response or remove the record)")
        if m["role"] == "system" and i != 0:
            raise UserError(f"{loc}: field '{field_name}[{i}]' is a system turn after the start "
                            "(move it to the first position)")


def _messages(obj: dict, loc: str, tools: list[dict] | None = None) -> list[dict]:
    turns = obj["messages"]
    if not isinstance(turns, list):
        raise UserError(f"{loc}: field 'messages' must be a list of {{role, content}} objects")
    names = {t["function"]["name"] for t in tools or []}
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{loc}: field 'messages[{i}]' must be an object with 'role' and 'content'")
        role = _need_str(turn, "role", loc, label=f"messages[{i}].role")
        if role not in (*ROLES, "tool"):
            raise UserError(f"{loc}: field 'messages[{i}].role' is '{role}'; expected one of {', '.join(ROLES)}, tool")
        calls = turn.get("tool_calls") if role == "assistant" else None
        if calls is not None and turn.get("content") is None:  # the OpenAI shape: a call without text has null
            turn = {**turn, "content": ""}
        content = _need_str(turn, "content", loc, label=f"messages[{i}].content")
        out.append({"role": role, "content": content})
        if calls is not None:
            out[-1]["tool_calls"] = read_tool_calls(calls, loc, f"messages[{i}].tool_calls", names)
        for key in ("name", "tool_call_id"):
            if role == "tool" and isinstance(turn.get(key), str):
                out[-1][key] = turn[key]
        if turn.get("reasoning_content") is not None:  # the OpenAI/DeepSeek field, for templates that render it
            if role != "assistant":
                raise UserError(f"{loc}: field 'messages[{i}].reasoning_content' is on a {role} turn (only assistant "
                                "turns reason; move it or delete it)")
            out[-1]["reasoning_content"] = _need_str(turn, "reasoning_content", loc,
                                                     label=f"messages[{i}].reasoning_content")
    _check_conversation(out, loc, "messages")
    check_tool_results(out, loc, "messages")
    return out


def _sharegpt(obj: dict, loc: str) -> list[dict]:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise UserError(f"{loc}: field 'conversations' must be a list of {{from, value}} objects")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{loc}: field 'conversations[{i}]' must be an object with 'from' and 'value'")
        who = _need_str(turn, "from", loc, label=f"conversations[{i}].from")
        if who not in SHAREGPT_ROLES:
            raise UserError(f"{loc}: field 'conversations[{i}].from' is '{who}'; "
                            "expected one of system, human, gpt")
        value = _need_str(turn, "value", loc, label=f"conversations[{i}].value")
        out.append({"role": SHAREGPT_ROLES[who], "content": value})
    _check_conversation(out, loc, "conversations")
    return out


def _alpaca(obj: dict, loc: str) -> list[dict]:
    instruction = _need_str(obj, "instruction", loc)
    extra = obj.get("input", "") or ""
    if not isinstance(extra, str):
        raise UserError(f"{loc}: field 'input' must be a string, got {type(extra).__name__}")
    output = _need_str(obj, "output", loc, allow_empty=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        messages.insert(0, {"role": "system", "content": obj["system"]})
    return messages


def _prompt_completion(obj: dict, loc: str) -> list[dict]:
    prompt = _need_str(obj, "prompt", loc)
    completion = _need_str(obj, "completion", loc, allow_empty=False)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _turns(value, loc: str, name: str) -> list[dict]:
    """A message list of {role, content} objects, checked turn by turn (the prompt or one side of a pair)."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{loc}: field '{name}' must be a string or a non-empty list of {{role, content}} objects")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise UserError(f"{loc}: field '{name}[{i}]' must be an object with 'role' and 'content'")
        role = _need_str(turn, "role", loc, label=f"{name}[{i}].role")
        if role not in ROLES:
            raise UserError(f"{loc}: field '{name}[{i}].role' is '{role}'; expected one of {', '.join(ROLES)}")
        turns.append({"role": role, "content": _need_str(turn, "content", loc, label=f"{name}[{i}].content")})
    return turns


def _response(obj: dict, key: str, loc: str) -> list[dict]:
    """One side of a pair given with its prompt: a string, or a list of assistant turns."""
    if key not in obj:
        raise UserError(f"{loc}: missing field '{key}'")
    value = obj[key]
    turns = [{"role": "assistant", "content": value}] if isinstance(value, str) else _turns(value, loc, key)
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            raise UserError(f"{loc}: field '{key}[{i}].role' is '{turn['role']}'; a response holds assistant turns "
                            "only (move the other turns into 'prompt')")
        if not turn["content"].strip():
            where_ = key if isinstance(value, str) else f"{key}[{i}].content"
            raise UserError(f"{loc}: field '{where_}' is an empty response (write it or remove the record)")
    return turns


def _preference(obj: dict, loc: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) of a pair, in either of its forms."""
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UserError(f"{loc}: field 'prompt' is empty (write the prompt the responses answer)")
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _turns(prompt, loc, "prompt")
        chosen, rejected = _response(obj, "chosen", loc), _response(obj, "rejected", loc)
    else:  # two whole conversations: the prompt is what they share, the responses their last assistant turns
        whole = {key: _turns(obj[key], loc, key) for key in ("chosen", "rejected")}
        for key, turns in whole.items():
            if turns[-1]["role"] != "assistant":
                raise UserError(f"{loc}: field '{key}' does not end with an assistant turn (end each side with the "
                                "response being compared)")
        prompt = whole["chosen"][:-1]
        if whole["rejected"][:-1] != prompt:
            n = min(len(whole["rejected"]), len(whole["chosen"])) - 1
            i = next((i for i in range(n) if whole["rejected"][i] != prompt[i]), n)
            raise UserError(f"{loc}: field 'rejected[{i}]': the prompt differs between chosen and rejected (both "
                            "must hold the same turns before their last assistant turn; give a shared 'prompt' "
                            "instead)")
        chosen, rejected = whole["chosen"][-1:], whole["rejected"][-1:]
        for key, turns in (("chosen", chosen), ("rejected", rejected)):
            if not turns[0]["content"].strip():
                raise UserError(f"{loc}: field '{key}[{len(whole[key]) - 1}].content' is an empty response "
                                "(write it or remove the record)")
    if not prompt or prompt[-1]["role"] != "user":
        raise UserError(f"{loc}: field 'prompt' must end with a user turn (the responses answer it)")
    for i, m in enumerate(prompt):
        if m["role"] == "system" and i != 0:
            raise UserError(f"{loc}: field 'prompt[{i}]' is a system turn after the start (move it to the first "
                            "position)")
    if chosen == rejected:
        raise UserError(f"{loc}: fields 'chosen' and 'rejected' are identical (a pair needs two different responses; "
                        "remove the record)")
    return prompt, chosen, rejected


def to_record(obj: dict, fmt: str, loc: str) -> Record:
    """Validate one raw object in format `fmt` and return the canonical Record."""
    if fmt == "messages":
        if "messages" not in obj:
            raise UserError(f"{loc}: missing field 'messages' (format is 'messages')")
        tools = read_tools(obj["tools"], loc) if obj.get("tools") is not None else None
        return Record(messages=_messages(obj, loc, tools), tools=tools, source=loc)
    if fmt == "sharegpt":
        if "conversations" not in obj:
            raise UserError(f"{loc}: missing field 'conversations' (format is 'sharegpt')")
        return Record(messages=_sharegpt(obj, loc), source=loc)
    if fmt == "alpaca":
        return Record(messages=_alpaca(obj, loc), source=loc)
    if fmt == "prompt_completion":
        return Record(messages=_prompt_completion(obj, loc), source=loc)
    if fmt == "text":
        return Record(text=_need_str(obj, "text", loc, allow_empty=False), source=loc)
    if fmt == "classification":
        text = _need_str(obj, "text", loc, allow_empty=False)
        pair = obj.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise UserError(f"{loc}: field 'text_pair' must be a string, got {type(pair).__name__}")
        label = obj.get("label")
        if label is None or isinstance(label, (dict, list)) or isinstance(label, float):
            raise UserError(f"{loc}: field 'label' must be a string or an integer class name")
        return Record(text=text, text_pair=pair, label=str(label), source=loc)
    if fmt == "preference":
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise UserError(f"{loc}: missing field '{key}' (format is 'preference')")
        prompt, chosen, rejected = _preference(obj, loc)
        return Record(messages=prompt, chosen=chosen, rejected=rejected, source=loc)
    raise UserError(f"{loc}: unknown format '{fmt}' (use one of {', '.join(FORMATS)})")


def load_records(path: str | Path, fmt: str = "auto", errors: list[str] | None = None, *,
                 columns: dict[str, str] | None = None, split: str | None = None, config: str | None = None,
                 role: str = "train") -> tuple[list[Record], str]:
    """Read and validate every record of a data file or dataset; returns (records, detected format).

    With `errors` given (lint), every bad record is reported there and skipped instead of stopping.
    """
    return parse_records(read_raw(path, errors, columns=columns, split=split, config=config, role=role), path, fmt,
                         errors)


def parse_records(items, path: str | Path, fmt: str = "auto", errors: list[str] | None = None
                  ) -> tuple[list[Record], str]:
    """load_records on (line, object) pairs already read from `path` (lint reads a file once for two uses)."""
    records: list[Record] = []
    for line, obj in items:
        loc = where(path, line)
        try:
            fmt = known_format(obj, fmt, loc)
            records.append(to_record(obj, fmt, loc))
        except UserError as err:
            if errors is None:
                raise
            errors.append(str(err))
    if not records and errors is None:
        raise UserError(f"{path}: no records found (add at least one)")
    return records, fmt


def known_format(obj: dict, fmt: str, loc: str) -> str:
    """`fmt`, or for `auto` the format the record's fields say."""
    if fmt != "auto":
        return fmt
    detected = detect_format(obj)
    if not detected:
        raise UserError(f"{loc}: cannot tell the format from fields {sorted(obj)} (expected 'messages', "
                        "'conversations', 'instruction'+'output', 'prompt'+'completion', 'text', 'text'+'label' or "
                        "'chosen'+'rejected'; or set format:)")
    return detected


def stream_records(path: str | Path, fmt: str = "auto", *, columns: dict[str, str] | None = None,
                   split: str | None = None, config: str | None = None):
    """The records of a file or dataset one at a time, validated as load_records validates them
    (`streaming: true`: a file bigger than memory is never held whole)."""
    for line, obj in read_raw(path, columns=columns, split=split, config=config):
        loc = where(path, line)
        fmt = known_format(obj, fmt, loc)
        yield to_record(obj, fmt, loc)
