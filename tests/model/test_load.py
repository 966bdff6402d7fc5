import time

import pytest
import torch

from deltatune.data.examples import CHATML_TEMPLATE, IGNORE_INDEX, tokenize_conversation
from deltatune.errors import UserError
from deltatune.model.load import load_causal_lm, resolve, save_pretrained_atomic

from conftest import make_tiny_llama, make_tokenizer


def test_missing_chat_template_falls_back_to_chatml_and_is_saved(tmp_path):
    tok = make_tokenizer(chat_template=None)
    folder = tmp_path / "m"
    make_tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    model, loaded = load_causal_lm(str(folder))
    assert loaded.chat_template == CHATML_TEMPLATE
    save_pretrained_atomic(model, loaded, tmp_path / "final")
    _, reloaded = load_causal_lm(str(tmp_path / "final"))
    assert reloaded.chat_template == CHATML_TEMPLATE
    assert not list(tmp_path.glob(".final.tmp-*"))  # no temporary folder left behind


def test_resolve_errors(tmp_path):
    with pytest.raises(UserError, match="not an embedded name"):
        resolve(str(tmp_path / "nope"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        resolve(str(fake))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    assert resolve("someone/some-model") == "someone/some-model"  # hub ids pass through


@pytest.mark.integration
def test_embedded_smollm2_loads_from_cache_and_masks_its_template():
    resolve("smollm2-135m-instruct")  # converts on a fresh machine; cached afterwards
    start = time.perf_counter()
    model, tok = load_causal_lm("smollm2-135m-instruct")
    assert time.perf_counter() - start < 30  # the 5 s target is measured by `deltatune demo`, not here
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2 pads with its end-of-turn token
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 👋"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    (ex,) = tokenize_conversation(tok, messages)
    trained = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "Hello! 👋<|im_end|>Goodbye.<|im_end|>"
    assert "You are a helpful AI assistant" in tok.decode(ex.input_ids)  # template's default system prompt, untrained
