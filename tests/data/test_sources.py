"""Data the way users have it: parquet and Arrow files, save_to_disk folders and hub ids through `datasets`,
`columns` renaming, a weighted mix of several sources, and a bounded evaluation sample."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltatune.cli import main
from deltatune.data.formats import load_records
from deltatune.data.sources import draw_mix, seeded_sample
from deltatune.errors import UserError

from conftest import chat, write_jsonl

CHATS = [chat(f"say {w}", f"{w} {w}") for w in ("fox", "dog", "cat", "sun", "sky", "tea", "owl", "elk")]


def plain(records):
    return [(r.messages, r.text, r.label) for r in records]


def test_parquet_arrow_and_save_to_disk_read_as_the_jsonl_does(tmp_path):
    want, fmt = load_records(write_jsonl(tmp_path / "c.jsonl", CHATS))
    table = pa.Table.from_pylist(CHATS)
    pq.write_table(table, tmp_path / "c.parquet")
    saved = datasets.Dataset(table)
    saved.save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": saved, "test": saved.select(range(2))}).save_to_disk(tmp_path / "two")
    for path in (tmp_path / "c.parquet", tmp_path / "one", tmp_path / "two"):
        got, got_fmt = load_records(path)
        assert plain(got) == plain(want) and got_fmt == fmt == "messages", path
        assert got[2].source == f"{path}:row 3"  # rows are named like lines
    arrow = next((tmp_path / "one").glob("*.arrow"))
    assert plain(load_records(arrow)[0]) == plain(want)
    assert len(load_records(tmp_path / "two", role="test")[0]) == 2  # test_file reads the test split
    with pytest.raises(UserError, match=r"two: split 'validation' does not exist \(splits: train, test"):
        load_records(tmp_path / "two", role="validation")


def test_columns_map_other_field_names_onto_the_formats(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "id": i} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    records, fmt = load_records(tmp_path / "qa.parquet", columns={"instruction": "question", "output": "answer"})
    assert fmt == "alpaca" and records[1].messages[-1] == {"role": "assistant", "content": "a1"}
    with pytest.raises(UserError, match=r"qa.parquet:row 1: column 'prompt' \(columns: instruction: prompt\) is not "
                                        r"in this record; its columns are answer, id, question"):
        load_records(tmp_path / "qa.parquet", columns={"instruction": "prompt", "output": "answer"})
    # Without the mapping the fields are not there: the usual format error, naming the row.
    with pytest.raises(UserError, match=r"qa.parquet:row 1: cannot tell the format from fields"):
        load_records(tmp_path / "qa.parquet")


def test_a_column_of_the_wrong_type_names_the_row_and_field(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"messages": "not a list"}]), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet:row 1: field 'messages' must be a list"):
        load_records(tmp_path / "bad.parquet")


def test_an_unreachable_hub_id_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^hf://nobody/nothing: cannot read it from the Hugging Face hub .*disk"):
        load_records("hf://nobody/nothing")


def test_the_mix_draws_each_source_by_weight_seeded():
    big, small = list(range(90)), list(range(100, 110))
    mixed, shares = draw_mix([("big", big, 1.0), ("small", small, 1.0)], seed=3)
    assert [s.drawn for s in shares] == [50, 50] and len(mixed) == 100
    assert sorted(x for x in mixed if x >= 100) == sorted(small * 5)  # the small source repeated whole
    assert len({x for x in mixed if x < 100}) == 50  # the big one sampled without replacement
    assert draw_mix([("big", big, 1.0), ("small", small, 1.0)], seed=3)[0] == mixed
    assert draw_mix([("big", big, 1.0), ("small", small, 1.0)], seed=4)[0] != mixed
    assert [s.drawn for s in draw_mix([("big", big, 3.0), ("small", small, 1.0)], seed=0)[1]] == [75, 25]


def test_evaluation_is_a_seeded_sample_in_file_order():
    records = list(range(50))
    assert seeded_sample(records, None, 0) == records and seeded_sample(records, 60, 0) == records
    picked = seeded_sample(records, 10, 0)
    assert len(picked) == 10 and picked == sorted(picked) and picked == seeded_sample(records, 10, 0)


CONFIG = """model: {model}
method: lora
output_dir: out
max_steps: 2
per_device_train_batch_size: 4
learning_rate: 1.0e-3
logging_steps: 1
bf16: false
report_to: none
delta_report: false
metric: none
"""


def test_parquet_and_a_save_to_disk_folder_train_from_the_cli(tmp_path, tiny_model_dir):
    pq.write_table(pa.Table.from_pylist(CHATS * 2), tmp_path / "train.parquet")
    datasets.Dataset.from_list(CHATS).save_to_disk(tmp_path / "val")
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir) + "train_file: train.parquet\nvalidation_file: val\n")
    assert main(["train", str(config)]) == 0
    log = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r and "event" not in r] == [1, 2]
    assert any(r.get("event") == "base_eval" and "loss" in r for r in log)  # the save_to_disk validation


def test_a_mix_of_two_sources_trains_and_says_what_each_gave(tmp_path, tiny_model_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", CHATS)
    rows = [{"question": f"say {w}", "answer": w} for w in ("one", "two", "three", "four")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir) + "validation_split: 0.25\ndatasets:\n"
                      "  - {path: a.jsonl, weight: 1}\n"
                      "  - {path: b.parquet, columns: {instruction: question, output: answer}, weight: 3}\n")
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    # 6 + 3 training records after each source's quarter is held out; weights 1:3 of the 9 draws.
    assert f"mix: {tmp_path / 'a.jsonl'}: 2 of the training draws from 6 records (weight 1), " in out
    assert f"mix: {tmp_path / 'b.parquet'}: 7 of the training draws from 3 records (weight 3), " in out
    log = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    (mix,) = [r["sources"] for r in log if r.get("event") == "data_mix"]
    assert [m["drawn"] for m in mix] == [2, 7] and sum(m["token_share"] for m in mix) == pytest.approx(1.0)
    assert 0 < mix[0]["token_share"] < 0.5  # 2 draws of 9, each a longer conversation than b's
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Data mix" in summary and "| b.parquet | 3 | 3 | 7 |" in summary


@pytest.mark.parametrize("extra, message", [
    ("datasets:\n  - {path: a.jsonl, weight: 0}\n", "datasets.0.weight"),
    ("train_file: a.jsonl\ndatasets:\n  - {path: a.jsonl}\n", "train_file and datasets: both name the training data"),
    ("train_file: a.parquet\n", "a.parquet: file not found"),
])
def test_bad_sources_are_one_line_and_write_nothing(tmp_path, tiny_model_dir, capsys, extra, message):
    write_jsonl(tmp_path / "a.jsonl", CHATS)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir) + extra)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_the_delta_reports_training_section_names_the_mix(tmp_path):
    from deltatune.delta.render import training_markdown, training_section

    mix = [{"source": "/d/a.jsonl", "available": 6, "drawn": 2, "weight": 1.0, "tokens": 40, "token_share": 0.2},
           {"source": "/d/b.parquet", "available": 3, "drawn": 7, "weight": 3.0, "tokens": 160, "token_share": 0.8}]
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 0, "event": "data_mix", "sources": mix},
                                             {"step": 1, "loss": 2.0}])
    section = training_section(tmp_path / "metrics.jsonl")
    assert section["data_mix"] == mix
    lines = training_markdown(section)
    assert "| a.jsonl | 1 | 6 | 2 | 20.0% |" in lines and "| b.parquet | 3 | 3 | 7 | 80.0% |" in lines


def test_lint_reads_datasets_and_samples_what_it_tokenises(tmp_path, tiny_tokenizer, capsys):
    from deltatune.data.lint import lint, print_report

    rows = [{"question": f"say {i}", "answer": f"{i} {i}"} for i in range(30)] + [{"question": "say 0",
                                                                                    "answer": "0 0"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    report = lint(str(tmp_path / "qa.parquet"), tiny_tokenizer, sample=10,
                  columns={"instruction": "question", "output": "answer"})
    assert report["errors"] == [] and report["records"] == 31 and report["sampled"] == {"tokenised": 10, "of": 31}
    assert report["examples"] == 10  # the token figures cover the sample
    assert report["duplicates"]["exact"] == 1  # duplicates are found among all 31 records
    print_report(report)
    assert "token figures from a seeded sample of 10 of 31 records" in capsys.readouterr().out
    assert main(["lint", str(tmp_path / "qa.parquet"), "--model", str(tmp_path / "none"), "--columns",
                 "instruction=question", "output=answer"]) == 2  # (no such model: the columns flag parses first)


def test_a_warm_start_reads_no_training_record_unless_it_must(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The second run with the same files and settings takes the held-out records and the training records'
    hash from the cache; it reads the files again only when their bytes change, or when the examples are not
    cached (train_on_inputs changed); every run trains the same way."""
    from deltatune import pipeline

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "train.jsonl", CHATS)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir) + "train_file: train.jsonl\nvalidation_split: 0.25\n"
                      "overwrite_output_dir: true\n")
    reads = []
    real = pipeline.read_records
    monkeypatch.setattr(pipeline, "read_records", lambda cfg, task: reads.append(1) or real(cfg, task))

    def train(*extra) -> list[dict]:
        capsys.readouterr()
        assert main(["train", str(config), *extra]) == 0
        log = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in log if "loss" in r and "event" not in r] + \
            [r["loss"] for r in log if r.get("event") == "base_eval"]

    cold = train()
    assert len(reads) == 1
    monkeypatch.setenv("DELTATUNE_PROGRESS", "1")
    assert train() == cold and len(reads) == 1  # warm: not read, the same losses (base eval included)
    assert "the data files are as when last read; 6 training records" in capsys.readouterr().err
    monkeypatch.setenv("DELTATUNE_PROGRESS", "0")
    assert train("train_on_inputs=true") != cold and len(reads) == 2  # examples missed: the records are read
    write_jsonl(tmp_path / "train.jsonl", CHATS[::-1])  # other bytes: read again
    train()
    assert len(reads) == 3
