"""GGUF export: the file loads back through transformers' GGUF loader with the same logits and tokenizer."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune.cli import main as cli_main
from deltatune.model.export import export_gguf

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world, café 東京 🙂"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype,atol", [("f32", 1e-5), ("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 3e-2)])
def test_gguf_round_trip_through_transformers(tmp_path, tiny_model_dir, dtype, atol):
    out = export_gguf(str(tiny_model_dir), tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
    want, got = logits(original, ids), logits(loaded, ids)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist() or dtype != "f32"

    gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS:
        assert gguf_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert gguf_tok.chat_template == tok.chat_template
    assert gguf_tok.eos_token == tok.eos_token


def test_export_cli_refuses_non_llama(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    from conftest import make_tokenizer

    make_tokenizer().save_pretrained(tmp_path / "bert")
    assert cli_main(["export", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "Llama-family" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.integration
def test_gguf_export_of_embedded_smollm2(tmp_path):
    from deltatune.model.load import load_causal_lm

    out = export_gguf("smollm2-135m-instruct", tmp_path / "smol.gguf", dtype="f32")
    model, tok = load_causal_lm("smollm2-135m-instruct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = tok("Ship to Oslo: 3 lamps, ordered by Maria.", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(logits(loaded, ids), logits(model.eval(), ids), atol=1e-4, rtol=0)
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert gguf_tok.chat_template == tok.chat_template
    assert gguf_tok("Hello, world!")["input_ids"] == tok("Hello, world!")["input_ids"]
