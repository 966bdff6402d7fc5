"""The tokenised-dataset cache returns what tokenisation would, and any change of input misses it."""

import pytest

from deltatune.data import cache as datacache
from deltatune.data.examples import build_sft_examples
from deltatune.data.formats import Record

from conftest import chat


def recs(answer="fox fox"):
    return [Record(messages=chat("say fox", answer)["messages"], source="f.jsonl:1"),
            Record(messages=chat("say dog", "dog")["messages"], source="f.jsonl:2")]


def test_second_preparation_reads_the_cache(tiny_tokenizer, tmp_path, monkeypatch):
    first, stats = datacache.cached_sft_examples(recs(), tiny_tokenizer, max_seq_length=64, cache=tmp_path)
    assert isinstance(first, datacache.ExampleTable)  # read from the cached Arrow files, cold as warm
    assert list(first) == build_sft_examples(recs(), tiny_tokenizer, max_seq_length=64)[0]
    assert first[1] == list(first)[1] and first[-1] == first[1] and first[:1] == [first[0]]
    (entry,) = [p for p in (tmp_path / "datasets").iterdir() if not p.name.startswith(".")]
    assert (entry / "stats.json").is_file() and len(list(entry.glob("chunk-*.arrow"))) == 1

    def fail(*a, **k):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(datacache, "build_sft_examples", fail)
    monkeypatch.setattr(datacache, "prepare", fail)
    again, again_stats = datacache.cached_sft_examples(recs(), tiny_tokenizer, max_seq_length=64, cache=tmp_path)
    assert again == first and again_stats == stats
    for changed in (dict(records=recs("fox")), dict(max_seq_length=32), dict(train_on_inputs=True)):
        kwargs = dict(records=recs(), max_seq_length=64, train_on_inputs=False) | changed
        records = kwargs.pop("records")
        with pytest.raises(AssertionError, match="tokenised again"):
            datacache.cached_sft_examples(records, tiny_tokenizer, cache=tmp_path, **kwargs)


def test_processes_and_chunks_prepare_what_one_pass_does(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datacache, "CHUNK", 3)  # several chunks, and several processes, on a small set
    monkeypatch.setattr(datacache, "MIN_PARALLEL", 6)
    records = [Record(messages=chat(f"say {w}", f"{w} {w}")["messages"], source=f"f.jsonl:{i}")
               for i, w in enumerate(["fox", "dog", "cat", "sun", "sky", "tea", "owl", "elk"] * 2)]
    want, want_stats = build_sft_examples(records, tiny_tokenizer, max_seq_length=64)
    for procs in (1, 2):
        got, stats = datacache.cached_sft_examples(records, tiny_tokenizer, max_seq_length=64, num_proc=procs,
                                                   cache=tmp_path / str(procs))
        assert list(got) == want and stats == want_stats  # same examples, same order, same counts
    (entry,) = [p for p in (tmp_path / "2" / "datasets").iterdir() if not p.name.startswith(".")]
    assert len(list(entry.glob("chunk-*.arrow"))) == 6


def test_a_damaged_entry_is_rebuilt(tiny_tokenizer, tmp_path):
    first = list(datacache.cached_sft_examples(recs(), tiny_tokenizer, max_seq_length=64, cache=tmp_path)[0])
    (entry,) = [p for p in (tmp_path / "datasets").iterdir() if not p.name.startswith(".")]
    chunk = next(entry.glob("chunk-*.arrow"))
    chunk.write_bytes(chunk.read_bytes()[:40])  # a cut file
    again, _ = datacache.cached_sft_examples(recs(), tiny_tokenizer, max_seq_length=64, cache=tmp_path)
    assert list(again) == first


def test_the_table_hashes_as_the_resume_check_hashes_its_examples(tiny_tokenizer, tmp_path, monkeypatch):
    import hashlib

    from deltatune.train.checkpoint import data_fingerprint

    monkeypatch.setattr(datacache, "CHUNK", 3)  # several Arrow files: the table has several batches
    records = [Record(messages=chat(f"say {w}", f"{w} " * (i + 1))["messages"], source=f"f.jsonl:{i}")
               for i, w in enumerate(["fox", "dog", "cat", "sun", "sky", "tea", "owl"])]
    table, _ = datacache.cached_sft_examples(records, tiny_tokenizer, max_seq_length=64, cache=tmp_path)
    assert len(table.table.to_batches()) > 1
    assert data_fingerprint(table) == data_fingerprint(list(table))  # vectorised, the same bytes
    examples = list(table)
    examples[3].labels[-1] = 7  # one label differs: the hash differs
    assert data_fingerprint(examples) != data_fingerprint(table)
    assert table.lengths() == [len(ex.input_ids) for ex in table] and table.sources()[2] == "f.jsonl:2"
    assert hashlib.sha256().hexdigest() != data_fingerprint(table)
