"""From canonical records to examples: token ids and the labels the loss counts.

The label mask is the heart of SFT: the loss must count the assistant's tokens only,
including each turn's end-of-turn token (or the tuned model never learns to stop). We derive
the trained spans by *rendering* the conversation with the tokenizer's own chat template:
the text added by each assistant turn is the difference between the conversation rendered
up to that turn and the same prefix rendered with the generation prompt. No marker strings
are searched for, so the mask is right for any template that renders prefixes consistently,
and a template that does not is reported instead of silently mis-masked.

Continued pre-training cuts concatenated documents into blocks where every token trains. A
classification example puts its class id at the *last* token's label position (everything
else IGNORE_INDEX), so the training loop's count of label positions per step counts examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from deltatune.data.formats import Record
from deltatune.errors import UserError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips

# Used (and saved with the model) when a tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    source: str = ""
    # The segment of each token (0: text, 1: text_pair) where the model takes them (BERT-family
    # encoders): a model served with `tokenizer(text, pair)` must have trained on the same ids.
    token_type_ids: list[int] | None = None


@dataclass
class DatasetStats:
    examples: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    label_tokens: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict], source: str = "") -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the [start, end) character spans the loss covers.

    Each span is the text an assistant turn adds (its content and end-of-turn token), with the
    template's trailing whitespace after the end-of-turn token left out.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(before):
            raise UserError(
                f"{source}: the model's chat template renders this conversation differently turn by turn, "
                "so the assistant tokens cannot be located (use a template that renders prefixes "
                "consistently, or set train_on_inputs: true)")
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], *, train_on_inputs: bool = False,
                          source: str = "") -> Example:
    """Token ids and labels for one conversation (not yet truncated)."""
    text, spans = assistant_char_spans(tokenizer, messages, source)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_inputs:
        return Example(ids, list(ids), source)
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(s <= start < e for s, e in spans):
            labels[t] = ids[t]
    return Example(ids, labels, source)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation up to (not including) its last assistant turn, ready to generate."""
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    text = render(tokenizer, history, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_sft_examples(records: list[Record], tokenizer, *, max_seq_length: int, train_on_inputs: bool = False,
                       name: str = "data", progress=None) -> tuple[list[Example], DatasetStats]:
    """Tokenise, mask, truncate; drop (and count) examples left with no trained token.
    `progress(n)`, when given, is told of every record done."""
    if tokenizer.chat_template is None:
        raise UserError("the tokenizer has no chat template (the model loader sets ChatML; this is a bug)")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("the tokenizer is not a fast (Rust) tokenizer, so token offsets are unavailable "
                        "(provide tokenizer.json with the model)")
    stats = DatasetStats()
    examples = []
    for record in records:
        if progress is not None:
            progress(1)
        if not record.messages:
            raise UserError(f"{record.source}: record has no conversation; task 'sft' needs chat records "
                            "(messages, conversations, instruction/output or prompt/completion)")
        ex = tokenize_conversation(tokenizer, record.messages, train_on_inputs=train_on_inputs, source=record.source)
        if len(ex.input_ids) > max_seq_length:
            stats.truncated += 1
            ex = Example(ex.input_ids[:max_seq_length], ex.labels[:max_seq_length], ex.source)
        n_labels = sum(1 for x in ex.labels[1:] if x != IGNORE_INDEX)  # position 0 is never predicted
        if n_labels == 0:
            stats.dropped_no_labels += 1
            continue
        stats.label_tokens += n_labels
        stats.tokens += len(ex.input_ids)
        examples.append(ex)
    stats.examples = len(examples)
    if not examples:
        raise UserError(f"{name}: every example lost all its trained tokens to truncation at "
                        f"max_seq_length={max_seq_length} (raise max_seq_length or shorten the prompts)")
    return examples, stats


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded hold-out: the same seed and file always give the same split."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * fraction))
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]











# --- continued pre-training ------------------------------------------------------------------

def build_text_blocks(records: list[Record], tokenizer, *, max_seq_length: int,
                      name: str = "data", progress=None) -> tuple[list[Example], DatasetStats]:
    """Concatenate documents, each followed by the end-of-text token, and cut fixed-length blocks.

    Every token is trained (labels = input ids). The last, shorter block is kept rather than
    thrown away; no document boundary needs padding. The separator is the tokenizer's eos token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos token to separate documents (set eos_token in tokenizer_config.json)")
    stream: list[int] = []
    for record in records:
        if progress is not None:
            progress(1)
        if record.text is None:
            raise UserError(f"{record.source}: record has no 'text' field; task 'text' needs {{\"text\": ...}} records")
        stream += tokenizer(record.text, add_special_tokens=False)["input_ids"] + [eos]
    blocks = [stream[i: i + max_seq_length] for i in range(0, len(stream), max_seq_length)]
    blocks = [b for b in blocks if len(b) > 1]  # a block of one token predicts nothing
    if not blocks:
        raise UserError(f"{name}: the text holds fewer than 2 tokens (add text)")
    stats = DatasetStats(examples=len(blocks), tokens=sum(len(b) for b in blocks),
                         label_tokens=sum(len(b) - 1 for b in blocks),
                         notes=[f"{len(records)} documents packed into {len(blocks)} blocks "
                                f"of up to {max_seq_length} tokens"])
    return [Example(list(b), list(b), f"{name}:block{i}") for i, b in enumerate(blocks)], stats


# --- classification ---------------------------------------------------------------------------

def label_names(records: list[Record]) -> list[str]:
    """The label set of the training data, in a stable order (numerically when every label is an integer)."""
    names = {r.label for r in records}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def takes_pairs(tokenizer) -> bool:
    """Whether the tokenizer marks where `text` ends and `text_pair` begins (a separator token or
    segment ids); one without a pair template would run the two texts together."""
    first, second = "the first text", "the second text"
    pair = tokenizer(first, second)
    glued = tokenizer(first)["input_ids"] + tokenizer(second, add_special_tokens=False)["input_ids"]
    return pair["input_ids"] != glued or any(pair.get("token_type_ids") or [])


def encode_text(tokenizer, text: str, pair: str | None, limit: int,
                token_types: bool) -> tuple[list[int], list[int] | None, bool]:
    """(input ids, token type ids or None, truncated) of one text or text pair, as
    `tokenizer(text, pair)` gives them, cut to `limit` tokens the tokenizer's own way."""
    enc = tokenizer(text, pair)
    truncated = len(enc["input_ids"]) > limit
    if truncated:
        enc = tokenizer(text, pair, truncation=True, max_length=limit)
    ids = list(enc["input_ids"])
    types = list(enc["token_type_ids"]) if token_types and "token_type_ids" in enc else None
    if len(ids) < 2:
        # Position 0 is never a label position in the shared batching code; pad with eos/sep.
        ids = ids + [tokenizer.sep_token_id or tokenizer.eos_token_id]
        types = types + types[-1:] if types else types
    return ids, types, truncated


def build_classification_examples(records: list[Record], tokenizer, *, max_seq_length: int,
                                  label2id: dict[str, int] | None, name: str = "data", token_types: bool = False,
                                  labels_from: str = "the training data", progress=None
                                  ) -> tuple[list[Example], DatasetStats]:
    """`label2id` None: records without labels (to predict) are allowed, and get no label position.
    `token_types`: keep the tokenizer's segment ids (the model's forward takes `token_type_ids`)."""
    limit = min(max_seq_length, getattr(tokenizer, "model_max_length", max_seq_length) or max_seq_length)
    stats = DatasetStats()
    examples = []
    pairs_ok: bool | None = None  # asked once, at the first pair
    for record in records:
        if progress is not None:
            progress(1)
        if label2id is not None and record.label is None:
            raise UserError(f"{record.source}: record has no 'label'; task 'classification' needs "
                            "{\"text\": ..., \"label\": ...} records")
        if label2id is not None and record.label not in label2id:
            raise UserError(f"{record.source}: label '{record.label}' does not occur in {labels_from} "
                            f"(known labels: {', '.join(label2id)})")
        if record.text_pair is not None and pairs_ok is None:
            pairs_ok = takes_pairs(tokenizer)
        if record.text_pair is not None and not pairs_ok:
            raise UserError(f"{record.source}: field 'text_pair': the model's tokenizer has no template for text "
                            "pairs, so text and text_pair would run together unmarked (join them into 'text', or "
                            "use an encoder whose tokenizer takes pairs, such as minilm-l6)")
        ids, types, truncated = encode_text(tokenizer, record.text, record.text_pair, limit, token_types)
        stats.truncated += truncated
        labels = [IGNORE_INDEX] * len(ids)
        if label2id is not None:
            labels[-1] = label2id[record.label]
        examples.append(Example(ids, labels, record.source, types))
        stats.tokens += len(ids)
    stats.examples = stats.label_tokens = len(examples)
    if not examples:
        raise UserError(f"{name}: no records")
    return examples, stats
