"""Tiny random-init models and small data files, built locally (no network) for fast tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
# Tests read stderr for the one error line; the stage lines are tested where they are asked for.
os.environ["DELTATUNE_PROGRESS"] = "0"
# `datasets` keeps what it converts (parquet into Arrow) in its own cache: one of the test session's, not the home's.
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(__import__("tempfile").mkdtemp(prefix="hf-datasets-"))))

# The SmolLM2 template, with its default system prompt: masking must cope with text the
# template inserts on its own.
SMOL_STYLE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, this is a test.",
    "customer=Maria; quantity=3; product=lamps; city=Oslo", "What is two plus two? It is four.",
    "Ünïcödé text: café, naïve, 東京, emoji 🙂.", "system user assistant", "Extract the order as",
]


def make_tokenizer(chat_template: str | None = SMOL_STYLE_TEMPLATE):
    """A byte-level BPE tokenizer (~400 tokens) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_tiny_bert(tokenizer, seed: int = 0):
    """A 2-layer random-init BERT encoder (the MiniLM architecture, tiny): a classification base."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128,
                                pad_token_id=tokenizer.pad_token_id))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT folder (safetensors + tokenizer), loaded as a classifier with a new head."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = make_tokenizer(chat_template=None)
    make_tiny_bert(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama folder (safetensors + tokenizer + chat template)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    make_tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bf16_model_dir(tmp_path_factory) -> Path:
    """The same tiny Llama saved in bfloat16 (config.json says so): `torch_dtype: auto` keeps it there."""
    folder = tmp_path_factory.mktemp("tiny-llama-bf16")
    tokenizer = make_tokenizer()
    make_tiny_llama(tokenizer).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def sft_file(tmp_path) -> Path:
    """24 short conversations: a pattern the tiny model can start learning in a few steps."""
    records = [chat(f"say {w}", f"{w} {w}") for w in ["fox", "dog", "cat", "sun", "sky", "tea"] * 4]
    return write_jsonl(tmp_path / "train.jsonl", records)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run `python -m deltatune ...` in a subprocess with this checkout's sources."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "deltatune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_fit(model, tokenizer, train, val, cfg, out_dir, log, device, loss_fn=None, resume=None):
    """`fit` handed a whole RunConfig's groups and this run's FitRun, as `pipeline.run` calls it."""
    from dataclasses import replace

    from deltatune.pipeline import fit_run
    from deltatune.train.loop import fit

    run = fit_run(cfg, Path(out_dir), log, device, resume)
    if loss_fn is not None:
        run = replace(run, loss_fn=loss_fn)
    return fit(model, tokenizer, train, val, cfg.train, cfg.memory, run)
