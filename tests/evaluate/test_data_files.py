"""A classifier serves the way it trained: text pairs keep their token types through training,
evaluation and `predict`, so plain transformers' `model(**tokenizer(text, pair))` gives the logits
deltatune scored. `deltatune eval` scores a classifier on labelled data; `deltatune predict`
labels a file."""

import json
import random

import pytest
import torch

from deltatune.cli import main
from deltatune.data.formats import Record
from deltatune.data.text_examples import build_classification_examples, takes_pairs

from conftest import make_tiny_llama, make_tokenizer, write_jsonl

WORDS = ["red", "blue", "green", "cat", "dog", "fish", "sun", "rain", "snow", "tea", "milk", "wine", "a", "the",
         "is", "not", "same", "as", "like", "and"]


def make_bert_dir(root, seed: int = 0):
    """A 2-layer random-init BERT classifier base with a real BERT tokenizer (WordPiece, [CLS] A [SEP] B [SEP],
    token types 0 then 1): the shape of MiniLM, tiny."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"])
                     + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2,
                         pad_token_id=tokenizer.pad_token_id)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    vocab.unlink()  # the saved tokenizer has its own copy
    return root


def pair_records(n: int, seed: int) -> list[dict]:
    """`same` when both texts name the same thing: only the pair, read as two segments, tells."""
    rng = random.Random(seed)
    things = WORDS[:12]
    out = []
    for _ in range(n):
        a = rng.choice(things)
        b = a if rng.random() < 0.5 else rng.choice([t for t in things if t != a])
        out.append({"text": f"the {a}", "text_pair": f"a {b}", "label": "same" if a == b else "different"})
    return out


def train_pair_classifier(tmp_path, model_dir, steps: int = 8):
    """final/ of a short CLI classification run on text pairs."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp_path / "train.jsonl", pair_records(48, seed=1))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ntask: classification\ntrain_file: train.jsonl\noutput_dir: out\n"
                      f"max_steps: {steps}\nlearning_rate: 5e-3\nper_device_train_batch_size: 8\nbf16: false\n"
                      "delta_report: false\nvalidation_split: 0\n")
    assert main(["train", str(config)]) == 0
    return tmp_path / "out" / "final"


def plain_logits(final, records: list[dict]) -> torch.Tensor:
    """What a user serving final/ with plain transformers gets."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    with torch.no_grad():
        return torch.cat([model(**tokenizer(r["text"], r["text_pair"], return_tensors="pt")).logits for r in records])


def test_pair_examples_keep_their_token_types(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_bert_dir(tmp_path / "bert"))
    assert takes_pairs(tokenizer) and not takes_pairs(make_tokenizer(chat_template=None))
    record = Record(text="the cat", text_pair="a dog is blue", label="different", source="t:1")
    (ex,), _ = build_classification_examples([record], tokenizer, max_seq_length=64,
                                             label2id={"different": 0, "same": 1}, token_types=True)
    enc = tokenizer("the cat", "a dog is blue")
    assert ex.input_ids == enc["input_ids"] and ex.token_type_ids == enc["token_type_ids"]
    assert 0 in ex.token_type_ids and 1 in ex.token_type_ids
    (cut,), stats = build_classification_examples([record], tokenizer, max_seq_length=6, label2id={"different": 0},
                                                  token_types=True)
    want = tokenizer("the cat", "a dog is blue", truncation=True, max_length=6)
    assert stats.truncated == 1 and cut.input_ids == want["input_ids"] and cut.token_type_ids == want["token_type_ids"]


def test_a_pair_classifier_predicts_what_plain_transformers_computes_on_final(tmp_path, capsys):
    final = train_pair_classifier(tmp_path, make_bert_dir(tmp_path / "bert"))
    held_out = pair_records(12, seed=99)
    unlabelled = [{k: v for k, v in r.items() if k != "label"} | {"id": i} for i, r in enumerate(held_out)]
    write_jsonl(tmp_path / "new.jsonl", unlabelled)
    assert main(["predict", "--model", str(final), "--data", str(tmp_path / "new.jsonl"),
                 "--out", str(tmp_path / "pred.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(12)) and all(r["text_pair"] for r in rows)  # input fields kept
    ours = torch.tensor([[r["probabilities"]["different"], r["probabilities"]["same"]] for r in rows])
    logits = plain_logits(final, held_out)
    torch.testing.assert_close(ours, logits.softmax(-1), rtol=1e-4, atol=1e-5)
    assert [r["predicted"] for r in rows] == [["different", "same"][i] for i in logits.argmax(-1).tolist()]

    # The parity means something: the model reads the segment ids, so dropping them moves the logits.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    enc = AutoTokenizer.from_pretrained(final)(held_out[0]["text"], held_out[0]["text_pair"], return_tensors="pt")
    with torch.no_grad():
        zeroed = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       token_type_ids=torch.zeros_like(enc["token_type_ids"])).logits
    assert not torch.allclose(zeroed, logits[:1], atol=1e-4)

    # eval scores the same records the same way: its accuracy is plain transformers' accuracy.
    write_jsonl(tmp_path / "test.jsonl", held_out)
    capsys.readouterr()
    assert main(["eval", "--model", str(final), "--data", str(tmp_path / "test.jsonl"), "--json",
                 "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    truth = [r["label"] == "same" for r in held_out]
    accuracy = sum(bool(p) == t for p, t in zip(logits.argmax(-1).tolist(), truth)) / len(truth)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert {"loss", "macro_f1", "per_class", "confusion_matrix", "labels"} <= set(result)
    assert result["labels"] == ["different", "same"] and sum(map(sum, result["confusion_matrix"])) == 12
    assert set(result["per_class"]["same"]) >= {"precision", "recall", "f1", "support"}
    assert json.loads((tmp_path / "eval.json").read_text()) == result


@pytest.mark.integration
def test_the_embedded_minilm_serves_pairs_the_way_it_trained(tmp_path):
    final = train_pair_classifier(tmp_path, "minilm-l6", steps=2)
    held_out = pair_records(6, seed=7)
    write_jsonl(tmp_path / "new.jsonl", held_out)
    assert main(["predict", "--model", str(final), "--data", str(tmp_path / "new.jsonl"),
                 "--out", str(tmp_path / "pred.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    labels = list(rows[0]["probabilities"])
    ours = torch.tensor([[r["probabilities"][label] for label in labels] for r in rows])
    torch.testing.assert_close(ours, plain_logits(final, held_out).softmax(-1), rtol=1e-4, atol=1e-5)


def test_bad_classifier_inputs_are_one_line_errors(tmp_path, tiny_bert_dir, tiny_model_dir, capsys):
    # A pair file for a model whose tokenizer has no pair template: refused, nothing trained or written.
    write_jsonl(tmp_path / "train.jsonl", pair_records(16, seed=3))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_bert_dir}\ntask: classification\ntrain_file: train.jsonl\noutput_dir: out\n"
                      "max_steps: 1\nbf16: false\n")
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.jsonl:1: field 'text_pair'" in err and "no template for text pairs" in err
    assert not (tmp_path / "out").exists()

    final = train_pair_classifier(tmp_path / "run", make_bert_dir(tmp_path / "bert"), steps=1)
    write_jsonl(tmp_path / "odd.jsonl", [{"text": "the cat", "text_pair": "a cat", "label": "maybe"}])
    capsys.readouterr()
    assert main(["eval", "--model", str(final), "--data", str(tmp_path / "odd.jsonl"),
                 "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "label 'maybe' does not occur in the labels of" in err
    assert not (tmp_path / "e.json").exists()

    write_jsonl(tmp_path / "no_text.jsonl", [{"text_pair": "a cat"}])
    assert main(["predict", "--model", str(final), "--data", str(tmp_path / "no_text.jsonl"),
                 "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "no_text.jsonl:1: field 'text'" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()
    (tmp_path / "p.jsonl").write_text("kept\n")
    write_jsonl(tmp_path / "ok.jsonl", [{"text": "the cat", "text_pair": "a cat"}])
    assert main(["predict", "--model", str(final), "--data", str(tmp_path / "ok.jsonl"),
                 "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "p.jsonl").read_text() == "kept\n"
    assert main(["predict", "--model", str(tiny_model_dir), "--data", str(tmp_path / "ok.jsonl"),
                 "--out", str(tmp_path / "q.jsonl")]) == 2
    assert "not a sequence classifier" in capsys.readouterr().err


def test_decoder_classifiers_take_no_token_types(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from deltatune.model.parts import accepts_token_types

    tokenizer = make_tokenizer()
    assert not accepts_token_types(make_tiny_llama(tokenizer))
    assert accepts_token_types(BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)))
