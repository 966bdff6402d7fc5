"""streaming: true — records read as training reads them, through a seeded shuffle buffer, tokenised one at a
time; the run trains from the CLI, resumes at the same example, and is refused where a stream cannot work."""

import json

import pytest
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.data.examples import DatasetStats, Example
from deltatune.data.formats import Record
from deltatune.data.stream import ExampleStream, shuffled
from deltatune.errors import UserError

from conftest import chat, write_jsonl


def test_the_shuffle_is_seeded_a_permutation_and_bounded_by_its_buffer():
    items = list(range(100))
    out = list(shuffled(iter(items), buffer=10, seed=3))
    assert sorted(out) == items and out != items
    assert out == list(shuffled(iter(items), buffer=10, seed=3)) != list(shuffled(iter(items), buffer=10, seed=4))
    # An item leaves at most `buffer` places before it came in: the buffer is all the shuffle holds.
    assert all(out.index(x) >= x - 10 for x in items)
    assert sorted(shuffled(iter(items), buffer=1000, seed=0)) == items  # a buffer wider than the data


def stream(records, length, made=None):
    def make(batch: list[Record], stats: DatasetStats):
        (record,) = batch
        if made is not None:
            made.append(record.source)
        stats.examples += 1
        return [Example([1, int(record.source)], [1, int(record.source)], record.source)] if record.text else []
    return ExampleStream(lambda: iter(records), make, length, seed=0, key="k", name="data", max_seq_length=8,
                         buffer=3)


def test_the_stream_goes_round_the_passes_in_order_and_can_go_back():
    records = [Record(text="x" if i % 4 else "", source=str(i)) for i in range(8)]  # every 4th makes nothing
    made = []
    s = stream(records, length=20, made=made)
    got = [s[i].source for i in range(20)]
    first_pass = [r.source for r in shuffled(iter(records), 3, 0) if r.text]
    assert got[:6] == first_pass and sorted(got[6:12]) == sorted(first_pass)  # 6 examples a pass, passes reshuffled
    assert got[6:12] != first_pass
    assert s[19] is s[19] and s.stats.examples == len(made)
    again = stream(records, length=20)
    assert again[13].source == got[13]  # a resume asks for a later position first: the same example
    assert [again[i].source for i in range(20)] == got  # and going back reads from the start again
    with pytest.raises(IndexError):
        s[20]
    with pytest.raises(UserError, match="every example lost all its trained tokens"):
        stream([Record(text="", source="0")], length=2)[0]


CONFIG = """model: {model}
method: lora
train_file: train.jsonl
validation_file: val.jsonl
streaming: true
output_dir: {out}
max_steps: 6
save_steps: 2
per_device_train_batch_size: 2
learning_rate: 1.0e-2
logging_steps: 1
bf16: false
report_to: none
delta_report: false
metric: none
seed: 1
"""
WORDS = ["fox", "dog", "cat", "sun", "sky", "tea", "owl"]


def streaming_run(tmp_path, model, out="out"):
    write_jsonl(tmp_path / "train.jsonl", [chat(f"say {w}", f"{w} {w}") for w in WORDS])
    write_jsonl(tmp_path / "val.jsonl", [chat("say elk", "elk elk")])
    config = tmp_path / f"{out}.yaml"
    config.write_text(CONFIG.format(model=model, out=out))
    return config


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "event" not in r]


def test_a_streaming_run_trains_and_resumes_at_the_same_example(tmp_path, tiny_model_dir, monkeypatch, capsys):
    reference = streaming_run(tmp_path, tiny_model_dir, "reference")
    assert main(["train", str(reference)]) == 0
    steps = losses(tmp_path / "reference")
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6]  # 12 examples from 7 records: the stream went round
    adapter = load_file(tmp_path / "reference" / "final" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters trained

    crashed = streaming_run(tmp_path, tiny_model_dir, "crashed")
    monkeypatch.setenv("DELTATUNE_TEST_KILL", "step:3:SIGTERM")
    assert main(["train", str(crashed)]) == 143
    monkeypatch.delenv("DELTATUNE_TEST_KILL")
    assert main(["train", str(crashed), "--resume"]) == 0
    assert losses(tmp_path / "crashed") == steps  # the same examples at the same steps after the resume
    resumed = load_file(tmp_path / "crashed" / "final" / "adapter_model.safetensors")
    assert all((resumed[k] == v).all() for k, v in adapter.items())


@pytest.mark.parametrize("extra, message", [
    ("max_steps: -1\n", "streaming: true needs max_steps"),
    ("validation_file: null\n", "streaming: true cannot hold out a share of a stream"),
    ("task: text\nvalidation_split: 0\nvalidation_file: null\n", "streaming: true works for task sft"),
])
def test_what_a_stream_cannot_do_is_one_line(tmp_path, tiny_model_dir, capsys, extra, message):
    config = streaming_run(tmp_path, tiny_model_dir)
    config.write_text(config.read_text() + extra)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
