"""The delta report's numbers on constructed cases whose answers are known."""

import copy
import json

import numpy as np
import pytest
import torch

from deltatune.data.examples import build_sft_examples
from deltatune.data.formats import Record
from deltatune.delta import measures as delta
from deltatune.delta import weights as weight_change
from deltatune.evaluate import probes

from conftest import chat, make_tiny_llama, run_cli, write_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    from conftest import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    return make_tiny_llama(tok).eval()


def _val_examples(tok):
    records = [Record(messages=chat(f"say {w}", f"{w} {w}")["messages"]) for w in ["fox", "dog", "cat", "sun"]]
    return build_sft_examples(records, tok, max_seq_length=64)[0]


def test_identical_models_have_zero_delta_and_zero_kl(tok, base):
    twin = copy.deepcopy(base)
    weights = weight_change.weight_delta(base, twin)
    assert weights["changed_matrices"] == 0 and weights["relative_norm"] == 0.0
    assert all(m["relative_norm"] == 0 and m["effective_rank"] == 0 and m["intruders"] == 0
               for m in weights["matrices"])
    assert len(weights["matrices"]) == 2 * 7 + 2  # 7 matrices per layer, embeddings and head
    stats = delta.paired_pass(base, twin, _val_examples(tok), tok.pad_token_id, CPU)
    assert stats.kl.sum() == pytest.approx(0.0, abs=1e-9) and stats.kl_tokens.sum() > 0
    assert np.allclose(stats.nll_base, stats.nll_tuned)
    samples = delta.sample_from_base(base, tok, 4, max_new_tokens=8, device=CPU)
    assert delta.paired_pass(base, twin, samples, tok.pad_token_id, CPU).summary()["kl_per_token"] == \
        pytest.approx(0.0, abs=1e-9)


def test_known_low_rank_perturbation_ranks_first_with_its_norm_rank_and_intruders(tok, base):
    tuned = copy.deepcopy(base)
    target = tuned.model.layers[1].mlp.down_proj.weight  # 32 x 64
    w = target.detach().clone()
    # Rank-2 ΔW whose output directions are orthogonal to the base's top-20 left singular vectors,
    # with singular values (3, 2): energy 9/13 < 90 %, so the effective rank is 2, and both
    # directions dominate W_tuned's spectrum, so they are exactly 2 intruder dimensions.
    u_base = torch.linalg.svd(w, full_matrices=False)[0][:, :20]
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(32, 2, generator=gen)
    u = torch.linalg.qr(u - u_base @ (u_base.T @ u))[0]
    v = torch.linalg.qr(torch.randn(64, 2, generator=gen))[0]
    dw = u @ torch.diag(torch.tensor([3.0, 2.0])) @ v.T
    with torch.no_grad():
        target.add_(dw)
        q = tuned.model.layers[0].self_attn.q_proj.weight
        q.add_(1e-3 * torch.randn(q.shape, generator=gen))  # a small change elsewhere, to be outranked
    weights = weight_change.weight_delta(base, tuned)
    top = {m["name"]: m for m in weights["matrices"]}[weights["top"][0]]
    assert top["name"] == "model.layers.1.mlp.down_proj.weight"
    assert top["relative_norm"] == pytest.approx(float(dw.norm() / w.norm()), rel=1e-4)
    assert top["effective_rank"] == 2 and top["intruders"] == 2
    assert weights["changed_matrices"] == 2
    q_row = {m["name"]: m for m in weights["matrices"]}["model.layers.0.self_attn.q_proj.weight"]
    assert q_row["intruders"] == 0 and q_row["effective_rank"] > 2  # dense noise is high-rank
    layers = {r["layer"]: r for r in weights["by_layer"]}
    assert layers[1]["relative_norm"] > layers[0]["relative_norm"] > 0
    assert weights["by_module_type"][0]["module_type"] == "down_proj"
    # The functional change shows up as a KL > 0 on the same inputs.
    stats = delta.paired_pass(base, tuned, _val_examples(tok), tok.pad_token_id, CPU)
    assert stats.summary()["kl_per_token"] > 0


def test_effective_rank_counts_energy():
    dw = torch.diag(torch.tensor([10.0, 1.0, 1.0, 0.0]))
    assert weight_change.effective_rank(dw) == 1  # 100/102 ≥ 90 %
    assert weight_change.effective_rank(torch.eye(5)) == 5  # flat spectrum: 4/5 < 90 %
    assert weight_change.effective_rank(torch.zeros(3, 4)) == 0


def test_lora_delta_is_b_times_a_and_base_weights_stay_untouched(tok, base):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft initialises B = 0; make the adapter do something
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    weights = weight_change.weight_delta(base, model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" not in n)
    rows = {m["name"]: m for m in weights["matrices"]}
    lora_rows = [m for m in weights["matrices"] if m["lora"]]
    assert len(lora_rows) == 4 and {m["module_type"] for m in lora_rows} == {"q_proj", "v_proj"}
    assert all(1 <= m["effective_rank"] <= 4 for m in lora_rows)
    assert weights["changed_matrices"] == 4
    # Same numbers as comparing against the merged model's full weights.
    merged = copy.deepcopy(model).merge_and_unload()
    merged_rows = {m["name"]: m for m in weight_change.weight_delta(base, merged)["matrices"]}
    for m in lora_rows:
        assert merged_rows[m["name"]]["relative_norm"] == pytest.approx(m["relative_norm"], rel=1e-4)
        assert merged_rows[m["name"]]["effective_rank"] == m["effective_rank"]
    layer0_q = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = ((layer0_q.lora_B["default"].weight @ layer0_q.lora_A["default"].weight).detach()
                * layer0_q.scaling["default"])
    assert rows["model.layers.0.self_attn.q_proj.weight"]["delta_norm"] == pytest.approx(float(expected.norm()),
                                                                                        rel=1e-5)


def test_an_adapter_runs_base_is_the_tuned_model_with_its_adapters_off(tok, base):
    """The report of a LoRA run loads no second model: every number equals the one against a separate base."""
    from peft import LoraConfig, get_peft_model

    from deltatune.delta.causal import measure

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    options = delta.ReportOptions(kl_samples=4, batch_size=2)

    def numbers(base_side):
        report = measure(base_side, model, tok, val_examples=_val_examples(tok), base_predictions=None,
                         tuned_predictions=None, metric="none", options=options, device=CPU)
        return json.dumps({k: v for k, v in report.items() if k != "seconds"}, sort_keys=True)
    alone = numbers(delta.AdaptersOff(model))
    assert alone == numbers(base)
    report = json.loads(alone)
    assert report["forgetting"]["general_text"]["kl_per_token"] > 0  # the adapters were on for the tuned side
    assert report["weights"]["changed_matrices"] == 4


def test_fact_recall_retention_drops_when_the_model_is_damaged(tok, base):
    prompts = [f"The quick brown {w}" for w in ["fox", "dog", "cat", "cow", "sun", "sky", "tea", "owl"]] + \
        ["Hello world", "What is two plus", "Extract the order", "customer=Maria;"]
    # Expected answers are the base model's own greedy completions, so the base scores 100 %.
    completions = probes.complete(base, tok, prompts, device=CPU)
    items = [probes.Probe(p, " ".join(probes.answer_words(c)[:2])) for p, c in zip(prompts, completions)
             if probes.answer_words(c)]
    assert len(items) >= 6
    base_ok, _ = probes.score(base, tok, items, CPU)
    assert all(base_ok)
    assert probes.retention(base_ok, probes.score(copy.deepcopy(base), tok, items, CPU)[0]) == 1.0
    damaged = copy.deepcopy(base)
    with torch.no_grad():
        damaged.lm_head.weight.copy_(torch.randn(damaged.lm_head.weight.shape,
                                                 generator=torch.Generator().manual_seed(3)))
    damaged_ok, _ = probes.score(damaged, tok, items, CPU)
    assert probes.retention(base_ok, damaged_ok) < 0.5


def test_probe_answer_matching():
    assert probes.is_correct(" Paris, the city of light", "Paris")
    assert probes.is_correct(" new delhi.", "New Delhi")
    assert not probes.is_correct(" Parisian", "Paris") and not probes.is_correct(" Lyon", "Paris")
    assert len(probes.builtin_probes()) >= 100


def test_bootstrap_ci_contains_the_point_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 50), rng.normal(1.0, 1.0, 800)
    for x in (small, large):
        point, lo, hi = delta.bootstrap_ci(x)
        assert lo <= point <= hi and point == pytest.approx(x.mean())
    width = lambda x: np.subtract(*delta.bootstrap_ci(x)[2:0:-1])  # noqa: E731
    assert width(large) < 0.5 * width(small)
    # Token-weighted mean: Σv/Σw.
    assert delta.bootstrap_ci([2.0, 6.0], [1.0, 3.0])[0] == pytest.approx(2.0)
    # A paired, consistent improvement is significant; noise around zero is not.
    b = rng.normal(0, 1, 200)
    assert delta.paired_gain(b, b + 0.5)["significant"] and delta.paired_gain(b, b + 0.5)["gain"] == pytest.approx(0.5)
    noise = rng.normal(0, 1, 200)
    tie = delta.paired_gain(b, b + noise - noise.mean())
    assert tie["gain"] == pytest.approx(0.0, abs=1e-12) and not tie["significant"]


def test_general_text_sample_is_fixed_and_user_corpus_works(tmp_path):
    a, source = delta.general_texts(seed=0)
    assert a == delta.general_texts(seed=0)[0] and len(a) == delta.GENERAL_CHUNKS and "pydoc" in source
    corpus = tmp_path / "general.txt"
    corpus.write_text("First passage here.\n\nSecond passage there.\n", encoding="utf-8")
    texts, source = delta.general_texts(str(corpus))
    assert sorted(texts) == ["First passage here.", "Second passage there."] and source == str(corpus)


def test_train_writes_the_delta_report_and_compare_reproduces_it(tmp_path, tiny_model_dir, sft_file):
    test = write_jsonl(tmp_path / "test.jsonl", [chat("say fox", "fox fox"), chat("say dog", "dog dog")])
    write_jsonl(tmp_path / "probes.jsonl", [{"prompt": "say fox", "answer": "fox"}])  # named in the config below
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\ntest_file: test.jsonl\n"
                      "output_dir: out\nlearning_rate: 5e-3\nnum_train_epochs: 2\nper_device_train_batch_size: 4\n"
                      "logging_steps: 2\nmax_new_tokens: 8\nbf16: false\nkl_samples: 4\nside_by_side_prompts: 1\n"
                      "probe_files: [probes.jsonl]\n")
    proc = run_cli("train", str(config), "validation_split=0.25")
    assert proc.returncode == 0, proc.stderr
    assert "what fine-tuning changed" in proc.stdout and "fact recall" in proc.stdout
    out = tmp_path / "out"
    report = json.loads((out / "delta.json").read_text())
    assert (report["schema"] == "deltatune.delta" and report["schema_version"] == 2
            and report["task_type"] == "causal_lm")
    assert report["task"]["validation"]["loss"]["gain"] > 0  # lr 5e-3 on a repetitive task: loss falls
    assert report["task"]["metric"]["examples"] == 2 and len(report["side_by_side"]) == 1
    assert report["forgetting"]["general_text"]["kl_per_token"] > 0
    assert report["forgetting"]["base_samples"]["samples"] == 4
    assert report["forgetting"]["fact_recall"]["items"] == len(probes.BUILTIN_FACTS) + 1
    assert report["weights"]["changed_matrices"] == len(report["weights"]["matrices"])  # full fine-tuning
    assert report["training"]["curves"]["loss"] and report["training"]["curves"]["learning_rate"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html and "http" not in html
    assert "## Weight change" in (out / "report.md").read_text()

    proc = run_cli("compare", "--base", str(tiny_model_dir), "--tuned", str(out / "final"), "--data", str(test),
                   "--out", str(tmp_path / "cmp"), "--max-new-tokens", "8", "--kl-samples", "2")
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "cmp" / "delta.json").read_text())
    assert again["weights"]["relative_norm"] == pytest.approx(report["weights"]["relative_norm"], rel=1e-6)
    assert again["training"]["curves"]["loss"] == report["training"]["curves"]["loss"]  # found next to final/
    assert again["task"]["metric"]["tuned"] == pytest.approx(report["task"]["metric"]["tuned"])


def test_bad_probe_file_fails_before_training(tmp_path, tiny_model_dir, sft_file):
    (tmp_path / "probes.jsonl").write_text('{"prompt": "The capital of France is"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: train.jsonl\noutput_dir: out\n"
                      "probe_files: [probes.jsonl]\n")
    proc = run_cli("train", str(config))
    assert proc.returncode == 2
    assert "probes.jsonl:1: probe record needs a non-empty string field 'answer'" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and not (tmp_path / "out").exists()
