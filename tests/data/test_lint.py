"""`deltatune lint`: every bad record reported, and the figures training would see, checked exactly."""

import json

from deltatune.data.lint import lint, percentiles, print_report

from conftest import chat, run_cli, write_jsonl

LONG = ("the kettle switches off by itself when the water boils and the light ring turns white again; "
        "keep-warm mode holds the chosen temperature for thirty minutes and lifting the kettle cancels it")


def test_percentiles_nearest_rank():
    assert percentiles(list(range(10, 0, -1))) == {"min": 1, "p50": 5, "p90": 9, "p99": 10, "max": 10, "mean": 5.5}
    assert percentiles([]) == {}


def _length(tok, messages):
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def test_lint_figures(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    records = [chat("say fox", "fox fox"), chat("say dog", "dog dog is here"), chat("say fox", "fox fox"),
               chat("word " * 60, "ok"), chat("explain", LONG), chat("explain", LONG.replace("white", "blue"))]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", [chat("say dog", "dog dog is here"), chat("new", "a new answer here")])
    totals = [_length(tok, r["messages"]) for r in records]
    # Trained tokens: the answer and its end-of-turn token (the template puts the answer after "assistant\n").
    responses = [len(tok(r["messages"][-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
                 for r in records]
    # Record 4's prompt fills the limit exactly, so it keeps no trained token (the rendered text ends with
    # a newline after the end-of-turn token, which is neither prompt nor trained: hence the - 1).
    max_len = totals[3] - responses[3] - 1
    assert all(t <= max_len for i, t in enumerate(totals) if i != 3)

    report = lint(str(data), tok, max_seq_length=max_len, validation=str(val))
    assert report["errors"] == []
    assert report["records"] == 6 and report["format"] == "messages" and report["formats"] == {"messages": 6}
    assert report["roles"] == {"system": 0, "user": 6, "assistant": 6} or report["roles"] == {"user": 6, "assistant": 6}
    ordered = sorted(responses)
    assert report["tokens"]["response"] == {"min": ordered[0], "p50": ordered[2], "p90": ordered[5],
                                            "p99": ordered[5], "max": ordered[5],
                                            "mean": round(sum(responses) / 6, 2)}
    prompts = sorted(t - r for t, r in zip(totals, responses))
    assert report["tokens"]["prompt"]["p50"] == prompts[2] and report["tokens"]["total"]["max"] == max(totals)
    assert report["truncated"] == {"count": 1, "share": round(1 / 6, 4), "records": [f"{data}:4"]}
    assert report["no_trainable_tokens"]["count"] == 1 and report["no_trainable_tokens"]["records"] == [f"{data}:4"]
    assert report["short_responses"]["count"] == 3  # "fox fox" twice, "ok"
    assert report["duplicates"]["exact"] == 1 and report["duplicates"]["near"] == 1
    assert [(p["record"], p["repeats"], p["kind"]) for p in report["duplicates"]["pairs"]] == [
        (f"{data}:3", f"{data}:1", "exact"), (f"{data}:6", f"{data}:5", "near")]
    assert report["validation"]["overlap_exact"] == 1 and report["validation"]["overlap_near"] == 0
    assert report["validation"]["pairs"][0]["record"] == f"{val}:1"
    # The first example, with exactly its trained text marked.
    assert report["example"]["plain"].endswith("<|im_start|>user\nsay fox<|im_end|>\n"
                                               "<|im_start|>assistant\n[[fox fox<|im_end|>]]\n")
    assert report["example"]["plain"].count("[[") == 1


def test_lint_collects_every_bad_record_and_exits_1(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    good = json.dumps(chat("hi", "hello there"))
    data.write_text("\n".join([
        good,
        '{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
        "{not json",
        "[1, 2]",
        json.dumps(chat("bye", "goodbye then")),
        '{"messages": [{"role": "user", "content": "hi"}]}',
    ]) + "\n")
    proc = run_cli("lint", str(data), "--model", str(tiny_model_dir), "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["records"] == 2
    assert [e.split(": ", 1)[0] for e in report["errors"]] == [f"{data}:{n}" for n in (2, 3, 4, 6)]
    assert "field 'messages[0].role' is 'robot'" in report["errors"][0]
    assert "invalid JSON" in report["errors"][1] and "expected a JSON object" in report["errors"][2]
    assert "no assistant turn" in report["errors"][3]

    clean = write_jsonl(tmp_path / "ok.jsonl", [chat("hi", "hello there")])
    proc = run_cli("lint", str(clean), "--model", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert "[[hello there<|im_end|>]]" in proc.stdout and "0 errors" in proc.stdout


def test_lint_classification_labels(tmp_path, tiny_tokenizer, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "charged twice", "label": "billing"},
                                              {"text": "late parcel", "label": "shipping"},
                                              {"text": "refund please", "label": "billing"}])
    report = lint(str(data), tiny_tokenizer, max_seq_length=64)
    assert report["format"] == "classification" and report["errors"] == []
    assert report["labels"] == {"billing": 2, "shipping": 1}
    lengths = [len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"])
               for t in ("charged twice", "late parcel", "refund please")]
    assert report["tokens"]["text"]["max"] == max(lengths)
    print_report(report)
    assert "labels: billing 2, shipping 1" in capsys.readouterr().out
