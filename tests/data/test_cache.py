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
    assert first == build_sft_examples(recs(), tiny_tokenizer, max_seq_length=64)[0]
    assert len(list((tmp_path / "datasets").glob("*.json"))) == 1

    def fail(*a, **k):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(datacache, "build_sft_examples", fail)
    again, again_stats = datacache.cached_sft_examples(recs(), tiny_tokenizer, max_seq_length=64, cache=tmp_path)
    assert again == first and again_stats == stats
    for changed in (dict(records=recs("fox")), dict(max_seq_length=32), dict(train_on_inputs=True)):
        kwargs = dict(records=recs(), max_seq_length=64, train_on_inputs=False) | changed
        records = kwargs.pop("records")
        with pytest.raises(AssertionError, match="tokenised again"):
            datacache.cached_sft_examples(records, tiny_tokenizer, cache=tmp_path, **kwargs)
