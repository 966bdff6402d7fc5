"""Preference pairs: the three record forms, their errors, the response-only masks and the truncation rule."""

import json

import pytest

from deltatune.data.batching import collate, length_batches, micro_batches
from deltatune.data.examples import IGNORE_INDEX, build_preference_examples, build_sft_examples, truncate_pair
from deltatune.data.formats import load_records
from deltatune.data.lint import lint
from deltatune.errors import UserError

from conftest import write_jsonl

SYSTEM = [{"role": "system", "content": "Answer in JSON."}]
USER = {"role": "user", "content": "order 3 lamps"}
GOOD = {"role": "assistant", "content": '{"n": 3}'}
BAD = {"role": "assistant", "content": "Sure! 3 lamps."}


def trained_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


def test_the_three_forms_give_the_same_pair(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "order 3 lamps", "chosen": '{"n": 3}', "rejected": "Sure! 3 lamps."},
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    ])
    records, fmt = load_records(path)
    assert fmt == "preference"
    for r in records:
        assert (r.messages, r.chosen, r.rejected) == ([USER], [GOOD], [BAD])
    assert [r.source for r in records] == [f"{path}:{i}" for i in (1, 2, 3)]


def test_a_shared_conversation_keeps_its_earlier_turns_as_prompt(tmp_path):
    history = SYSTEM + [USER, {"role": "assistant", "content": "Which colour?"}, {"role": "user", "content": "red"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": history + [GOOD], "rejected": history + [BAD]}])
    record = load_records(path)[0][0]
    assert record.messages == history and record.chosen == [GOOD] and record.rejected == [BAD]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "field 'rejected' is an empty response"),
    ({"prompt": "p", "chosen": [], "rejected": "b"}, "field 'chosen' must be a string or a non-empty list"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]},
     "field 'rejected[0]': the prompt differs between chosen and rejected"),
    ({"chosen": [USER, GOOD], "rejected": [USER]}, "field 'rejected' does not end with an assistant turn"),
    ({"prompt": [USER, GOOD], "chosen": "a", "rejected": "b"}, "field 'prompt' must end with a user turn"),
    ({"prompt": [USER], "chosen": [USER], "rejected": "b"}, "field 'chosen[0].role' is 'user'"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "'prompt[0].role' is 'robot'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or a non-empty list"),
])
def test_bad_pairs_are_file_line_errors(tmp_path, record, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(UserError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value), err.value


def test_csv_pairs(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected\norder 3 lamps,"{""n"": 3}",Sure! 3 lamps.\n')
    record = load_records(path)[0][0]
    assert (record.messages, record.chosen, record.rejected) == ([USER], [GOOD], [BAD])


def test_each_side_trains_its_response_and_end_of_turn_only(tmp_path, tiny_tokenizer):
    # An earlier assistant turn in the prompt is context, never trained.
    history = [USER, {"role": "assistant", "content": "Which colour?"}, {"role": "user", "content": "red"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": history + [GOOD], "rejected": history + [BAD]}])
    records, _ = load_records(path)
    (pair,), stats = build_preference_examples(records, tiny_tokenizer, max_seq_length=512)
    assert trained_text(tiny_tokenizer, pair) == '{"n": 3}<|im_end|>'
    assert trained_text(tiny_tokenizer, pair.rejected) == "Sure! 3 lamps.<|im_end|>"
    prompt = tiny_tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert pair.input_ids[:n_prompt] == pair.rejected.input_ids[:n_prompt]  # the same prompt tokens on both sides
    assert stats.examples == 1 and stats.truncated == 0
    assert stats.label_tokens == sum(1 for s in (pair, pair.rejected) for x in s.labels if x != IGNORE_INDEX)


def pair_records(tmp_path, prompt_words: int, chosen_words: int, rejected_words: int):
    record = {"prompt": " ".join(["word"] * prompt_words), "chosen": " ".join(["yes"] * chosen_words),
              "rejected": " ".join(["no"] * rejected_words)}
    return load_records(write_jsonl(tmp_path / f"p{prompt_words}.jsonl", [record]))[0]


def test_a_long_pair_loses_prompt_tokens_from_the_left_first(tmp_path, tiny_tokenizer):
    records = pair_records(tmp_path, 60, 3, 5)
    (full,), _ = build_preference_examples(records, tiny_tokenizer, max_seq_length=1024)
    longest = max(len(full.input_ids), len(full.rejected.input_ids))
    limit = longest - 10
    (cut,), stats = build_preference_examples(records, tiny_tokenizer, max_seq_length=limit)
    # Exactly the 10 oldest tokens went, from both sides; every response token is still trained.
    assert cut.input_ids == full.input_ids[10:] and cut.rejected.input_ids == full.rejected.input_ids[10:]
    assert trained_text(tiny_tokenizer, cut) == trained_text(tiny_tokenizer, full)
    assert trained_text(tiny_tokenizer, cut.rejected) == trained_text(tiny_tokenizer, full.rejected)
    assert stats.truncated == 1
    assert stats.notes == [f"1 pairs lost prompt tokens from the left and 0 had both responses cut, to fit "
                           f"max_seq_length={limit}"]


def test_then_both_responses_are_cut_at_the_same_length(tmp_path, tiny_tokenizer):
    records = pair_records(tmp_path, 2, 40, 60)
    (full,), _ = build_preference_examples(records, tiny_tokenizer, max_seq_length=1024)
    prompt = full.labels.index(next(x for x in full.labels if x != IGNORE_INDEX))
    limit = 20
    assert len(full.input_ids) - (prompt - 1) > limit  # too long even with the prompt gone
    cut, lost_prompt, lost_response = truncate_pair(full, limit)
    assert lost_prompt and lost_response
    # One prompt token is kept (the first response token is predicted from it), then both responses are cut
    # at the same length: 19 response tokens each.
    for side, whole in ((cut, full), (cut.rejected, full.rejected)):
        assert side.input_ids == whole.input_ids[prompt - 1:][:limit]
        assert side.labels[0] == IGNORE_INDEX and all(x != IGNORE_INDEX for x in side.labels[1:])


def test_a_pair_fills_two_adjacent_rows(tmp_path, tiny_tokenizer):
    records = [r for w in ("a", "bb", "ccc") for r in pair_records(tmp_path, 2, len(w), 3 * len(w))]
    pairs, _ = build_preference_examples(records, tiny_tokenizer, max_seq_length=256)
    batch = collate(pairs, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, pair in enumerate(pairs):
        for row, side in ((2 * i, pair), (2 * i + 1, pair.rejected)):
            assert batch["input_ids"][row, :len(side.input_ids)].tolist() == side.input_ids
            assert batch["labels"][row, :len(side.labels)].tolist() == side.labels
    assert "reference_logps" not in batch
    for i, pair in enumerate(pairs):
        pair.reference_logp, pair.rejected.reference_logp = -1.0 - i, -2.0 - i
    assert collate(pairs, 0)["reference_logps"].tolist() == [-1.0, -2.0, -2.0, -3.0, -3.0, -4.0]
    # A token budget counts both rows of a pair and its longer side.
    widest = max(max(len(p.input_ids), len(p.rejected.input_ids)) for p in pairs)
    assert micro_batches([0, 1, 2], pairs, 8, max_tokens=2 * widest) == [[0], [1], [2]]
    assert length_batches(pairs, 8) == [[0, 1, 2]]


def test_preference_records_are_refused_where_another_format_is_needed(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [USER, GOOD]}])
    with pytest.raises(UserError, match="is not a preference pair"):
        build_preference_examples(load_records(path)[0], tiny_tokenizer, max_seq_length=64)
    assert json.loads(path.read_text())  # the file itself is fine for sft
    build_sft_examples(load_records(path)[0], tiny_tokenizer, max_seq_length=64)


def test_lint_shows_both_sides_and_counts_truncation_by_the_training_rule(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
        {"prompt": " ".join(["word"] * 80), "chosen": "yes", "rejected": "no no"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ])
    report = lint(str(path), tiny_tokenizer, max_seq_length=64)
    assert report["format"] == "preference" and report["records"] == 2
    assert report["errors"] == [f"{path}:3: fields 'chosen' and 'rejected' are identical (a pair needs two "
                                "different responses; remove the record)"]
    assert report["truncated"]["count"] == 1 and report["truncated"]["records"] == [f"{path}:2"]
    assert report["no_trainable_tokens"]["count"] == 0
    assert report["example"]["plain"].endswith('[[{"n": 3}<|im_end|>]]\n')
    assert report["example_rejected"]["plain"].endswith("[[Sure! 3 lamps.<|im_end|>]]\n")
    assert any("1 of 2 pairs are longer than max_seq_length=64" in w for w in report["warnings"])
