"""The tokenizer as GGUF metadata, the way llama.cpp and transformers' GGUF loader read it back.

Two kinds cover the families we export: byte-level BPE (Llama 3, Qwen, Phi-4, GPT-NeoX, OLMo 2; llama.cpp's
"gpt2" model) and SentencePiece-style BPE with byte fallback (Mistral, Gemma, Phi-3; llama.cpp's "llama" model,
which ranks merges by token score). Which one a tokenizer is, and whether it adds BOS or a leading space, is read
from its `tokenizer.json` and from what it does to a probe text, not from the model's name.
"""

from __future__ import annotations

import json
import re

from deltatune.data.examples import end_of_turn_id
from deltatune.errors import UserError

# llama.cpp's token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")

# The pre-tokenizer regexes llama.cpp knows by name (its `tokenizer.ggml.pre`): the split a byte-level vocabulary's
# merges were learned on. A regex not listed is written as "default" with a warning naming it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
NAMED_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def byte_level_split(pre: dict) -> str | None:
    """llama.cpp's name for how a byte-level tokenizer splits text before merging, or None if it has none."""
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    byte_regex = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)
    if byte_regex and kinds == ["ByteLevel"]:
        return "gpt-2"
    if byte_regex and kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM: digits one by one, then GPT-2's split
    splits = [p for p in parts if p.get("type") == "Split"]
    if len(splits) == 1 and kinds[-1] == "ByteLevel" and not byte_regex:
        return NAMED_SPLITS.get(splits[0].get("pattern", {}).get("Regex"))
    return None


def leading_space(tokenizer, text: str) -> bool:
    """Whether the tokenizer writes a space before the final "a" of `text` (SentencePiece's prefix space)."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    return bool(pieces) and pieces[-1].startswith("\u2581")


def token_table(spec: dict, vocab_size: int, unk: int | None) -> tuple[list[str], list[int], bool]:
    """(tokens, llama.cpp token types, whether SentencePiece-style) for every embedding row."""
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise UserError(f"export: the tokenizer is a {model.get('type')} model; GGUF export writes BPE tokenizers "
                        "(byte-level, or SentencePiece-style with byte fallback)")
    sentencepiece = bool(model.get("byte_fallback"))
    if not sentencepiece and "ByteLevel" not in json.dumps(pre):
        raise UserError("export: the BPE tokenizer is neither byte-level nor SentencePiece-style (byte fallback); "
                        "llama.cpp cannot tokenize it the same way")
    vocab = dict(model["vocab"])
    special, added = set(), set()
    for token in spec.get("added_tokens", []):
        vocab[token["content"]] = token["id"]
        (special if token.get("special") else added).add(token["id"])
    tokens = [None] * max(vocab_size, max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token

    def kind(index: int, token: str | None) -> int:
        if token is None:
            return UNUSED  # llama.cpp needs one token per embedding row; rows past the tokenizer are padding
        if index == unk and sentencepiece:
            return UNKNOWN
        if index in special:
            return CONTROL
        if index in added:
            return USER_DEFINED
        return BYTE if sentencepiece and BYTE_TOKEN.match(token) else NORMAL

    types = [kind(i, t) for i, t in enumerate(tokens)]
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types, sentencepiece


def write_vocab(writer, tokenizer, vocab_size: int) -> list[str]:
    """Write the tokenizer's metadata; returns warnings for what llama.cpp may read differently."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens, types, sentencepiece = token_table(spec, vocab_size, tokenizer.unk_token_id)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    warnings = []
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # llama.cpp's SentencePiece tokenizer merges the best-scoring pair first; a BPE vocabulary lists merged
        # tokens in merge order, so minus the id ranks them as the merges do.
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        # llama.cpp puts a space before the text at the start and after every special token, or nowhere. Chat
        # prompts are text between special tokens, so what transformers does there decides; its start-of-text
        # prefix (non-legacy SentencePiece) is then lost in llama.cpp for raw text only.
        after_special = leading_space(tokenizer, f"{tokenizer.eos_token}a")
        writer.add_add_space_prefix(after_special)
        if leading_space(tokenizer, "a") and not after_special:
            warnings.append("export: the tokenizer adds a leading space to raw text but not after special tokens; "
                            "llama.cpp does one or the other, so it tokenizes chat prompts as transformers does "
                            "and raw text without the leading space")
    else:
        split = byte_level_split(spec.get("pre_tokenizer") or {})
        if split is None:
            warnings.append("export: the tokenizer's pre-tokenizer regex is not one llama.cpp names; wrote "
                            "'default', so llama.cpp may split text differently from transformers")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(split or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    end_of_turn = end_of_turn_id(tokenizer)
    if end_of_turn is not None:  # every runtime stops where training taught the turn to end
        writer.add_eot_token_id(end_of_turn)
    # Plain text gets a BOS in llama.cpp exactly when transformers' tokenizer adds one; chat templates write theirs.
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return warnings
