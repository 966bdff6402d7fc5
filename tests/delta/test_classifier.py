"""The classification delta report on constructed cases whose answers are known."""

import copy
import json

import numpy as np
import pytest
import torch

from deltatune.data.formats import Record
from deltatune.data.text_examples import build_classification_examples
from deltatune.delta import measures as delta
from deltatune.delta.classifier import CkaSums, general_sentences, linear_cka, macro_f1_statistic, measure
from deltatune.delta.measures import ReportOptions
from deltatune.evaluate.metrics import classification_metrics
from deltatune.model.load import load_classifier

from conftest import run_cli, write_jsonl

CPU = torch.device("cpu")
LABELS = ["animal", "drink", "weather"]
WORDS = {"animal": ["fox", "dog", "cat"], "weather": ["sun", "sky", "rain"], "drink": ["tea", "coffee", "water"]}


def classification_records(n_per_word: int = 2) -> list[dict]:
    return [{"text": f"the {w} is here" if i % 2 else f"{w} {w}", "label": label}
            for label, words in WORDS.items() for w in words for i in range(n_per_word)]


def _examples(tok, model):
    records = [Record(text=r["text"], label=r["label"], source=f"t:{i}")
               for i, r in enumerate(classification_records())]
    return build_classification_examples(records, tok, max_seq_length=32, label2id=model.config.label2id)[0], records


def _measure(base, tuned, tok, tmp_path):
    # A small general corpus keeps the unit tests fast (the CLI tests use the default pydoc sample).
    corpus = tmp_path / "general.txt"
    corpus.write_text("\n\n".join(" ".join(f"Sentence {p}.{i} says the {w} is near." for i, w in
                                           enumerate(["fox", "dog", "tea", "sun", "sky", "cat"])) for p in range(12)))
    examples, records = _examples(tok, tuned)
    return measure(base, tuned, tok, val_examples=examples, metric_examples=examples,
                   metric_texts=[r.text for r in records], evaluated_on="test file",
                   options=ReportOptions(general_text_file=str(corpus), side_by_side=3, batch_size=16), device=CPU)


def test_linear_cka_known_answers_and_streaming():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q = torch.linalg.qr(torch.randn(8, 8, generator=gen))[0]
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    assert linear_cka(x, torch.randn(200, 8, generator=gen)) < 0.2            # unrelated representations
    # Streaming over batches equals the definition with centred n×n Gram matrices (HSIC).
    y = x @ torch.randn(8, 5, generator=gen) + 0.5 * torch.randn(200, 5, generator=gen)
    sums = CkaSums(8, 5)
    for chunk in range(0, 200, 37):
        sums.add(x[chunk: chunk + 37], y[chunk: chunk + 37])
    h = torch.eye(200, dtype=torch.float64) - 1.0 / 200
    k, l_ = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    expected = float((k * l_).sum() / (k.norm() * l_.norm()))
    assert sums.value() == pytest.approx(expected, rel=1e-9) and 0.2 < expected < 0.99


def test_macro_f1_bootstrap_matches_the_metric_and_is_paired():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, 60)
    pred = np.where(rng.random(60) < 0.7, true, rng.integers(0, 3, 60))
    stat = macro_f1_statistic(true, 3)
    assert stat(pred, np.arange(60)[None])[0] == pytest.approx(
        classification_metrics(pred.tolist(), true.tolist(), LABELS)["macro_f1"])
    same = delta.paired_statistic_gain(stat, pred, pred)
    assert same["gain"] == 0.0 and same["gain_ci"] == [0.0, 0.0] and not same["significant"]
    perfect = delta.paired_statistic_gain(stat, pred, true)
    assert perfect["tuned"] == 1.0 and perfect["gain"] > 0 and perfect["significant"]
    # For a mean statistic it reproduces paired_gain exactly (same resamples for the same seed).
    hits_b, hits_t = (pred == true).astype(float), np.ones(60)
    mean = delta.paired_statistic_gain(lambda v, idx: v[idx].mean(1), hits_b, hits_t)
    expected = delta.paired_gain(hits_b, hits_t)
    assert mean["significant"] == expected["significant"] and mean["examples"] == expected["examples"]
    for key in ("base", "tuned", "gain", "base_ci", "tuned_ci", "gain_ci"):
        assert np.allclose(mean[key], expected[key], rtol=0, atol=1e-12), key


def test_identical_classifier_has_zero_delta_cosine_one_cka_one_and_no_gain(tiny_bert_dir, tmp_path):
    # Two loads with the same seed: the same backbone and the same freshly initialised head.
    base, tok = load_classifier(str(tiny_bert_dir), LABELS, seed=7)
    twin, _ = load_classifier(str(tiny_bert_dir), LABELS, seed=7)
    report = _measure(base.eval(), twin.eval(), tok, tmp_path)
    w = report["weights"]
    assert w["changed_matrices"] == 0 and w["relative_norm"] == 0.0 and w["matrices"]
    assert not any(m["name"].startswith("classifier.") for m in w["matrices"])  # the head is listed apart
    assert [m["name"] for m in w["new"]] == ["classifier.weight", "classifier.bias"]
    assert all(m["delta_norm"] == 0.0 for m in w["new"]) and w["new"][0]["change_from_init"] == 0.0
    r = report["forgetting"]["representation"]
    assert r["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and r["cka"] == pytest.approx(1.0, abs=1e-6)
    assert r["sentences"] == 72  # more points than the 32 dimensions of the representation
    for key in ("accuracy", "macro_f1"):
        m = report["task"][key]
        assert m["gain"] == 0.0 and m["gain_ci"] == [0.0, 0.0] and not m["significant"] and m["examples"] == 18
    assert report["task"]["validation"]["loss"]["gain"] == pytest.approx(0.0, abs=1e-12)
    assert [x["base"] == x["tuned"] for x in report["side_by_side"]] == [True] * 3
    # A different seed gives a different head: the base really is "the head as training started".
    other, _ = load_classifier(str(tiny_bert_dir), LABELS, seed=8)
    assert not torch.equal(other.classifier.weight, base.classifier.weight)


def test_planted_change_in_one_layer_ranks_first_and_moves_the_representation(tiny_bert_dir, tmp_path):
    base, tok = load_classifier(str(tiny_bert_dir), LABELS, seed=0)
    tuned = copy.deepcopy(base)
    target = tuned.bert.encoder.layer[1].intermediate.dense.weight
    gen = torch.Generator().manual_seed(1)
    dw = 0.5 * torch.randn(target.shape, generator=gen)
    with torch.no_grad():
        target.add_(dw)
        tuned.bert.encoder.layer[0].attention.self.query.weight.add_(1e-3 * torch.randn(32, 32, generator=gen))
        tuned.classifier.weight.mul_(2.0)
    report = _measure(base.eval(), tuned.eval(), tok, tmp_path)
    w = report["weights"]
    top = {m["name"]: m for m in w["matrices"]}[w["top"][0]]
    assert top["name"] == "bert.encoder.layer.1.intermediate.dense.weight"
    w_base = base.bert.encoder.layer[1].intermediate.dense.weight.detach()
    assert top["relative_norm"] == pytest.approx(float(dw.norm() / w_base.norm()), rel=1e-4)
    assert w["changed_matrices"] == 2
    layers = {r["layer"]: r for r in w["by_layer"]}
    assert layers[1]["relative_norm"] > layers[0]["relative_norm"] > 0
    assert w["by_module_type"][0]["module_type"] == "intermediate.dense"  # BERT's three `dense` kept apart
    assert {m["name"]: m["change_from_init"] for m in w["new"]}["classifier.weight"] == pytest.approx(1.0)
    r = report["forgetting"]["representation"]
    assert r["cka"] < 1.0 - 1e-4 and r["mean_cosine"] < 1.0 - 1e-4 and r["drift"] == pytest.approx(1 - r["cka"])


def test_general_sentences_extend_the_causal_sample():
    sentences, source, passages = general_sentences(seed=0)
    assert "pydoc" in source and passages == 128 and 100 < len(sentences) <= 512
    assert sentences == general_sentences(seed=0)[0]
    causal = delta.general_texts(seed=0)[0]  # the causal report's passages come first
    assert sentences[0] in causal[0] and any(s in causal[-1] for s in sentences)
    assert general_sentences(seed=1)[0] != sentences


def _classify_config(tmp_path, model_dir, **extra) -> "Path":  # noqa: F821
    rows = classification_records(n_per_word=3)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", classification_records(n_per_word=1))
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    body = {"task": "classification", "model": str(model_dir), "train_file": "../train.jsonl",
            "validation_file": "../train.jsonl", "test_file": "../test.jsonl", "output_dir": "../runs/out",
            "learning_rate": 1e-2, "num_train_epochs": 6, "per_device_train_batch_size": 4, "bf16": False,
            "logging_steps": 2, "seed": 0, "side_by_side_prompts": 4, **extra}
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in body.items()))
    return config


def test_cli_classification_run_writes_the_report_and_compare_reproduces_it(tmp_path, tiny_bert_dir):
    config = _classify_config(tmp_path, tiny_bert_dir)
    proc = run_cli("train", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "what fine-tuning changed" in proc.stdout and "linear CKA" in proc.stdout
    out = tmp_path / "runs" / "out"
    report = json.loads((out / "delta.json").read_text())
    assert report["schema"] == "deltatune.delta" and report["schema_version"] == 2
    assert report["task_type"] == "classification"
    assert {"task", "forgetting", "weights", "side_by_side", "training", "seconds", "base_definition"} <= set(report)
    task = report["task"]
    assert task["accuracy"]["gain"] > 0 and task["accuracy"]["examples"] == 9 and task["evaluated_on"] == "test file"
    assert task["base_matches_training_start"] is True  # the reloaded base is the model as training started
    assert task["validation"]["loss"]["gain"] > 0 and task["metric"] == task["accuracy"]
    events = {e["event"]: e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "event" in e}
    for model, event in (("base", "base_eval"), ("tuned", "tuned_eval")):  # the run's own evaluations agree
        assert task["validation"]["loss"][model] == pytest.approx(events[event]["loss"], rel=1e-5)
        assert task["accuracy"][model] == pytest.approx(events[event]["accuracy"])
        assert task["macro_f1"][model] == pytest.approx(events[event]["macro_f1"])
    assert set(task["macro_f1"]) >= {"base", "tuned", "gain", "gain_ci", "significant"}
    r = report["forgetting"]["representation"]
    assert 0 < r["cka"] < 1 and -1 <= r["mean_cosine"] < 1  # lr 1e-2 on a tiny model: a large drift
    assert report["weights"]["changed_matrices"] == len(report["weights"]["matrices"])  # full fine-tuning
    assert [m["name"] for m in report["weights"]["new"]] == ["classifier.weight", "classifier.bias"]
    assert len(report["side_by_side"]) == 4 and set(report["side_by_side"][0]) == {"text", "label", "base", "tuned"}
    assert report["training"]["curves"]["loss"]
    # Titles show resolved paths, not configs/../runs.
    md = (out / "report.md").read_text()
    assert (str(out.resolve() / "final") in md and "/../" not in md
            and report["tuned_model"] == str(out.resolve() / "final"))
    assert "## Forgetting: representation drift" in md and "New head" in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3

    proc = run_cli("compare", "--base", str(tiny_bert_dir), "--tuned", str(out / "final"), "--data",
                   str(tmp_path / "test.jsonl"), "--out", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "cmp" / "delta.json").read_text())
    assert again["task_type"] == "classification"
    for key in ("accuracy", "macro_f1"):  # base rebuilt with the run's seed: the same numbers and intervals
        for field in ("base", "tuned", "gain_ci"):
            assert again["task"][key][field] == pytest.approx(task[key][field])
    assert again["weights"]["relative_norm"] == pytest.approx(report["weights"]["relative_norm"], rel=1e-6)
    assert again["forgetting"]["representation"]["cka"] == pytest.approx(r["cka"], rel=1e-6)
    assert again["task"]["validation"]["evaluated_on"] == "test.jsonl"

    # Two classifier folders: the tuned model against itself is a known zero.
    from deltatune.cli import main as cli_main

    assert cli_main(["compare", "--base", str(out / "final"), "--tuned", str(out / "final"), "--data",
                     str(tmp_path / "test.jsonl"), "--out", str(tmp_path / "self")]) == 0
    same = json.loads((tmp_path / "self" / "delta.json").read_text())
    assert same["task"]["accuracy"]["gain"] == 0 and not same["task"]["accuracy"]["significant"]
    assert same["weights"]["changed_matrices"] == 0 and all(m["delta_norm"] == 0 for m in same["weights"]["new"])
    assert same["forgetting"]["representation"]["cka"] == pytest.approx(1.0, abs=1e-6)
    # Classification data with a tuned model that is not a classifier: refused (exit 2), nothing written.
    assert cli_main(["compare", "--base", str(tiny_bert_dir), "--tuned", str(tiny_bert_dir), "--data",
                     str(tmp_path / "test.jsonl"), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_lora_classification_report_lists_adapter_deltas_and_the_saved_head(tmp_path, tiny_bert_dir):
    from deltatune.config import load_config
    from deltatune.pipeline import run

    config = _classify_config(tmp_path, tiny_bert_dir, method="lora", lora_r=4, num_train_epochs=3)
    result = run(load_config(config))
    report = json.loads((result.out_dir / "delta.json").read_text())
    w = report["weights"]
    lora = [m for m in w["matrices"] if m["lora"]]
    assert lora and all(m["delta_norm"] > 0 and 1 <= m["effective_rank"] <= 4 for m in lora)
    assert w["changed_matrices"] == len(lora)  # everything outside the adapters is untouched
    assert [m["name"] for m in w["new"]] == ["classifier.weight", "classifier.bias"]
    assert w["new"][0]["change_from_init"] > 0  # the head trained as modules_to_save
    assert report["task"]["base_matches_training_start"] is True
    assert report["forgetting"]["representation"]["cka"] < 1.0
    # The adapter folder compares like a full model folder (labels.json + modules_to_save head).
    from deltatune.cli import main as cli_main

    assert cli_main(["compare", "--base", str(tiny_bert_dir), "--tuned", str(result.out_dir / "final"), "--data",
                     str(tmp_path / "test.jsonl"), "--out", str(tmp_path / "cmp")]) == 0
    again = json.loads((tmp_path / "cmp" / "delta.json").read_text())
    assert again["task"]["accuracy"]["tuned"] == pytest.approx(report["task"]["accuracy"]["tuned"])
    assert again["weights"]["relative_norm"] == pytest.approx(w["relative_norm"], rel=1e-5)


def test_sweep_over_a_classification_config_charts_accuracy_gain_against_backbone_drift(tmp_path, tiny_bert_dir,
                                                                                        capsys):
    from deltatune.sweep import run_sweep

    config = _classify_config(tmp_path, tiny_bert_dir, num_train_epochs=2)
    frontier = run_sweep(str(config), ["learning_rate=1e-4,1e-2"])
    assert frontier["task_type"] == "classification" and frontier["gain_measure"] == "accuracy gain"
    runs = {r["name"]: r for r in frontier["runs"]}
    slow, fast = runs["learning_rate-1e-4"], runs["learning_rate-1e-2"]
    for r in (slow, fast):
        assert r["forgetting"] == pytest.approx(1 - r["cka"]) and r["within_budget"] == (r["cka"] >= 0.9)
    assert fast["forgetting"] > slow["forgetting"] and fast["weight_change"] > slow["weight_change"]
    rec = frontier["recommended"]
    assert frontier["recommendation_reason"] and (rec is None or runs[rec["name"]]["gain"] > 0)
    md = (tmp_path / "runs" / "out" / "frontier.md").read_text()
    assert "1 − CKA" in md and "CKA ≥ 0.90" in md
    assert "accuracy gain" in capsys.readouterr().out


@pytest.mark.integration
def test_real_minilm_classification_run_ends_with_the_delta_report(tmp_path):
    from deltatune.demo import routing as classify_task

    from conftest import REPO

    paths = classify_task.write(tmp_path / "data")
    proc = run_cli("train", str(REPO / "configs" / "classify_minilm.yaml"), f"train_file={paths['train']}",
                   f"validation_file={paths['validation']}", f"test_file={paths['test']}",
                   f"output_dir={tmp_path / 'out'}", "max_steps=3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "delta.json").read_text())
    assert report["task_type"] == "classification" and report["task"]["base_matches_training_start"] is True
    assert report["task"]["accuracy"]["examples"] == 120 and len(report["side_by_side"]) == 8
    r = report["forgetting"]["representation"]
    assert r["sentences"] > 300 and 0.5 < r["cka"] < 1.0 and 0.5 < r["mean_cosine"] < 1.0  # 3 steps: a small drift
    w = report["weights"]
    assert w["changed_matrices"] == len(w["matrices"]) == 6 * 6 + 4  # 6 per layer, 3 embeddings, pooler
    assert [m["name"] for m in w["new"]] == ["classifier.weight", "classifier.bias"]
    assert "linear CKA" in proc.stdout


def test_classifier_tokenizer_needs_a_pad_id_but_no_chat_template_or_eos(tmp_path, tiny_bert_dir):
    import shutil

    from deltatune.errors import UserError

    def variant(name, drop):
        folder = tmp_path / name
        shutil.copytree(tiny_bert_dir, folder)
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        for key in drop:
            settings.pop(key, None)
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
        return str(folder)

    # Like all-MiniLM-L6-v2: a pad token, no eos, no chat template. Nothing is generated, so it loads.
    _, tok = load_classifier(variant("bert-like", ["eos_token", "chat_template"]), LABELS)
    assert tok.eos_token is None and tok.pad_token_id is not None
    with pytest.raises(UserError, match="no pad and no end-of-sequence token"):
        load_classifier(variant("no-pad", ["eos_token", "pad_token", "chat_template"]), LABELS)


def test_classification_report_after_two_fsdp_processes(tmp_path, tiny_bert_dir):
    """Under torchrun rank 0 reports alone on final/ (FSDP's in-memory weights are shards)."""
    config = _classify_config(tmp_path, tiny_bert_dir, num_train_epochs=2, per_device_train_batch_size=2)
    proc = run_cli("train", "--nproc", "2", str(config), "parallelism=fsdp", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "runs" / "out"
    report = json.loads((out / "delta.json").read_text())
    assert report["task_type"] == "classification"
    assert report["task"]["base_matches_training_start"] is True
    events = {e["event"]: e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "event" in e}
    assert report["task"]["accuracy"]["tuned"] == pytest.approx(events["tuned_eval"]["accuracy"])
    assert report["weights"]["changed_matrices"] > 0
