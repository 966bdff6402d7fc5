"""GGUF export: the file loads back through transformers' GGUF loader with the same logits and tokenizer."""

import numpy as np
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
    assert "does not support the 'bert' architecture" in capsys.readouterr().err
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


@pytest.mark.integration
def test_the_converted_embedded_gguf_has_the_special_tokens_its_file_names():
    # Some transformers releases gave a llama GGUF's end-of-sequence token its beginning-of-sequence token; the
    # conversion reads them from the file itself (tokenizer.ggml.*_token_id), as llama.cpp does.
    from gguf import GGUFReader

    from deltatune.model.load import embedded_path, load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    fields = GGUFReader(str(embedded_path("smollm2-135m-instruct"))).fields
    assert tok.bos_token_id == int(fields["tokenizer.ggml.bos_token_id"].contents())
    assert tok.eos_token_id == int(fields["tokenizer.ggml.eos_token_id"].contents())
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")


# The families transformers' GGUF loader reads back; GPT-NeoX and OLMo 2 are checked with llama.cpp itself
# (scripts/llama_cpp_check.py) and, here, by the layout of what was written.
LOADABLE = ["gemma2", "gemma3", "llama3", "mistral", "phi3", "phi4", "qwen2", "qwen3"]
CHAT = [{"role": "user", "content": "say fox"}, {"role": "assistant", "content": "fox fox"}]


def family_folder(root, family):
    from families import SENTENCEPIECE, family_model, family_tokenizer, sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer(family) if family in SENTENCEPIECE else family_tokenizer(family)
    model = family_model(family, tokenizer).eval()
    # transformers' GGUF loader takes any file whose name says "mistral" for an architecture gguf-py lacks, so
    # the folder (whose name the file carries) is named neutrally.
    folder = root / ("tiny-model" if family == "mistral" else family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def gguf_fields(path):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def load_gguf(folder, out, family):
    # transformers' loader does not read Gemma's attention scale or Qwen3's head_dim (the file's key_length) and
    # takes its defaults (256, 128); llama.cpp reads key_length and scales Gemma by 1/sqrt(head_dim), as the
    # released models do and our tiny ones (head_dim 8) are built to.
    extra = {"gemma2": {"query_pre_attn_scalar": 8}, "gemma3": {"query_pre_attn_scalar": 8},
             "qwen3": {"head_dim": 8}}.get(family, {})
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=out.name, dtype=torch.float32, **extra).eval()


def worst_error(dtype, original):
    """The most a value may move under the type: half a quantisation step per block of 32 (taken per row, a
    looser bound), or the float type's rounding."""
    row_max = original.abs().amax(dim=-1, keepdim=True) if original.ndim == 2 else original.abs()
    steps = {"q8_0": row_max / 127, "q4_0": row_max / 8}
    if original.ndim < 2:  # norms and biases stay f32
        return torch.full_like(original, 1e-6)
    return steps.get(dtype, original.abs() * {"f16": 1e-3, "bf16": 8e-3}.get(dtype, 0) + 1e-6)


@pytest.mark.parametrize("family", LOADABLE)
def test_each_family_round_trips_through_transformers_gguf_loader(tmp_path, family):
    from deltatune.data.examples import end_of_turn_id

    folder, original, tok = family_folder(tmp_path, family)
    out = export_gguf(str(folder), tmp_path / "f32.gguf", dtype="f32")
    loaded = load_gguf(tmp_path, out, family)
    ids = torch.tensor([tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]])
    torch.testing.assert_close(logits(loaded, ids), logits(original, ids), atol=1e-5, rtol=0)

    gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS + ["line one\nline two", "  two spaces"]:
        assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"], (family, text)
    assert gguf_tok.chat_template == tok.chat_template
    _, fields = gguf_fields(out)
    assert fields["tokenizer.ggml.eot_token_id"] == end_of_turn_id(tok)  # runtimes stop where training did
    assert fields["tokenizer.ggml.model"] == ("llama" if family in {"mistral", "gemma2", "gemma3", "phi3"} else "gpt2")


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("family", ["gemma3", "llama3", "phi3", "qwen3"])
def test_quantised_weights_are_within_the_types_error(tmp_path, family, dtype):
    folder, original, _ = family_folder(tmp_path, family)
    out = export_gguf(str(folder), tmp_path / f"{dtype}.gguf", dtype=dtype)
    loaded = load_gguf(tmp_path, out, family)
    want, got = original.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    moved = 0.0
    for name, value in want.items():
        error = (got[name] - value).abs()
        assert bool((error <= worst_error(dtype, value)).all()), (name, float(error.max()))
        moved = max(moved, float(error.max()))
    assert moved > 0  # the type did round something: the file is not secretly f32


def test_gpt_neox_and_olmo2_are_written_in_llama_cpps_layout(tmp_path):
    from families import FAMILIES

    for family in ("gpt_neox", "olmo2"):
        folder, model, tok = family_folder(tmp_path, family)
        out = export_gguf(str(folder), tmp_path / f"{family}.gguf", dtype="f32")
        reader, fields = gguf_fields(out)
        tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
        assert fields["general.architecture"] == {"gpt_neox": "gptneox", "olmo2": "olmo2"}[family]
        assert "output.weight" in tensors  # llama.cpp requires the output layer for both
        assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
        if family == "gpt_neox":  # fused per head in transformers; all q rows, then k, then v in llama.cpp
            attention = model.gpt_neox.layers[0].attention
            qkv = attention.query_key_value.weight.detach().view(4, 3, 8, 32)
            q, k, v = qkv[:, 0].reshape(32, 32), qkv[:, 1].reshape(32, 32), qkv[:, 2].reshape(32, 32)
            np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"], torch.cat([q, k, v]).numpy())
            assert fields["gptneox.use_parallel_residual"] == model.config.use_parallel_residual
        else:
            np.testing.assert_array_equal(tensors["blk.0.attn_q_norm.weight"],
                                          model.model.layers[0].self_attn.q_norm.weight.detach().numpy())


def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_divisors():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from deltatune.model.export import llama3_rope_factors, rope_of

    config = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    factors = llama3_rope_factors(rope_of(config), 32)
    assert 1.0 in factors and 32.0 in factors  # both ends of the scale occur at this shape
    np.testing.assert_allclose(plain.numpy() / factors, scaled.double().numpy(), rtol=1e-6)


def test_an_architecture_llama_cpp_cannot_run_as_trained_is_refused_before_writing(tmp_path, capsys):
    from families import family_model, family_tokenizer

    tok = family_tokenizer("gemma2")
    model = family_model("gemma2", tok)
    model.config.query_pre_attn_scalar = 16
    model.save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    assert cli_main(["export", "--model", str(tmp_path / "g"), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "query_pre_attn_scalar 16 is not the 8 llama.cpp uses" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf*"))
