"""Objectives: continued pre-training on packed text blocks, and sequence classification."""

import json

import pytest
import torch

from deltatune.config import build_config
from deltatune.data.batching import collate
from deltatune.data.examples import IGNORE_INDEX
from deltatune.data.formats import Record
from deltatune.data.text_examples import build_text_blocks
from deltatune.errors import UserError
from deltatune.evaluate.metrics import classification_metrics
from deltatune.model.load import load_classifier
from deltatune.pipeline import run

from conftest import write_jsonl

WORDS = {"animal": ["fox", "dog", "cat"], "weather": ["sun", "sky", "rain"], "drink": ["tea", "coffee", "water"]}


def classification_file(path, n_per_word=3):
    records = [{"text": f"the {w} is here" if i % 2 else f"{w} {w}", "label": label}
               for label, words in WORDS.items() for w in words for i in range(n_per_word)]
    return write_jsonl(path, records)


def run_config(tmp_path, model_dir, **kw):
    base = dict(model=str(model_dir), output_dir=str(tmp_path / "out"), learning_rate=1e-2, num_train_epochs=4,
                per_device_train_batch_size=4, bf16=False, logging_steps=2, seed=0)
    return build_config({**base, **kw}, "test")


# --- text ---------------------------------------------------------------------------------------

def test_text_blocks_concatenate_documents_with_eos(tiny_tokenizer):
    docs = ["Hello world, this is a test.", "The quick brown fox.", "café"]
    blocks, stats = build_text_blocks([Record(text=d, source=f"d:{i}") for i, d in enumerate(docs)],
                                      tiny_tokenizer, max_seq_length=8)
    stream = [t for b in blocks for t in b.input_ids]
    expected = []
    for d in docs:
        expected += tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert stream == expected  # nothing lost, eos after every document
    assert all(len(b.input_ids) == 8 for b in blocks[:-1]) and 1 < len(blocks[-1].input_ids) <= 8
    assert all(b.labels == b.input_ids for b in blocks)  # every token trained
    assert stats.examples == len(blocks)


def test_text_task_end_to_end(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    docs = [{"text": "The quick brown fox jumps over the lazy dog. " * 3} for _ in range(12)]
    train = write_jsonl(tmp_path / "corpus.jsonl", docs)
    result = run(run_config(tmp_path, tiny_model_dir, task="text", train_file=str(train), max_seq_length=32,
                            validation_split=0.2, metric="none"))
    assert result.after["loss"] < result.before["loss"] * 0.8
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").config.num_hidden_layers == 2


def test_text_task_refuses_chat_data(tmp_path, tiny_model_dir, sft_file):
    with pytest.raises(UserError, match="format 'messages' does not fit task 'text'"):
        run(run_config(tmp_path, tiny_model_dir, task="text", train_file=str(sft_file)))
    assert not (tmp_path / "out").exists()


# --- classification -----------------------------------------------------------------------------

def test_classification_metrics_from_definitions():
    labels = ["a", "b", "c"]
    true = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(pred, true, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["a"]["precision"] == 1.0 and m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["precision"] == 0.5 and m["per_class"]["c"]["recall"] == 1.0
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_decoder_classifier_pools_last_real_token_whatever_the_padding(tiny_model_dir):
    model, tok = load_classifier(str(tiny_model_dir), ["x", "y"])
    assert model.config.pad_token_id == tok.pad_token_id is not None
    from deltatune.data.examples import Example

    short = tok("fox")["input_ids"] + [0]
    long = tok("the quick brown fox jumps")["input_ids"]
    batch = collate([Example(short, [IGNORE_INDEX] * len(short)), Example(long, [IGNORE_INDEX] * len(long))],
                    tok.pad_token_id)
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=torch.tensor([short])).logits
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["full", "lora", "head_only"])
def test_classification_trains_and_reloads_with_its_labels(tmp_path, tiny_model_dir, method):
    train = classification_file(tmp_path / "train.jsonl")
    kw = {"lora_r": 4} if method == "lora" else {}
    result = run(run_config(tmp_path, tiny_model_dir, task="classification", method=method, train_file=str(train),
                            validation_file=str(train), num_train_epochs=6, **kw))
    before, after = result.before, result.after
    assert after["loss"] < before["loss"]
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(after)
    assert sum(map(sum, after["confusion_matrix"])) == 27
    if method != "head_only":  # a frozen random-init tiny backbone gives the head little to work with
        assert after["accuracy"] > before["accuracy"]
    final = tmp_path / "out" / "final"
    if method == "lora":
        assert (final / "adapter_config.json").is_file() and json.loads((final / "labels.json").read_text())["id2label"]
    else:
        assert json.loads((final / "config.json").read_text())["id2label"] == {"0": "animal", "1": "drink",
                                                                               "2": "weather"}

    # Reloaded, the model predicts exactly what the tuned model did: its head is the trained one, not a fresh one.
    reloaded, tok = load_classifier(str(final), None, seed=123)
    reloaded.eval()
    from deltatune.data.formats import load_records
    from deltatune.data.text_examples import build_classification_examples
    from deltatune.evaluate.evaluate import predict

    examples, _ = build_classification_examples(load_records(train)[0], tok, max_seq_length=64,
                                                label2id=reloaded.config.label2id)
    predicted, true = predict(reloaded, examples, 8, tok.pad_token_id, torch.device("cpu"))
    assert classification_metrics(predicted, true, ["animal", "drink", "weather"])["accuracy"] == \
        pytest.approx(after["accuracy"])
    if method == "lora":
        from deltatune.cli import main as cli_main

        assert cli_main(["merge", "--adapter", str(final), "--out", str(tmp_path / "merged")]) == 0
        from transformers import AutoModelForSequenceClassification

        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        assert merged.config.id2label[0] == "animal"
        batch = collate(examples[:4], tok.pad_token_id)
        with torch.no_grad():
            torch.testing.assert_close(
                merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                atol=1e-4, rtol=0)


def test_unknown_label_in_validation_names_the_line(tmp_path, tiny_model_dir):
    train = classification_file(tmp_path / "train.jsonl")
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "fox", "label": "animal"}, {"text": "x", "label": "plant"}])
    with pytest.raises(UserError, match=r"val.jsonl:2: label 'plant' does not occur in the training data"):
        run(run_config(tmp_path, tiny_model_dir, task="classification", train_file=str(train),
                       validation_file=str(val)))
    assert not (tmp_path / "out").exists()
