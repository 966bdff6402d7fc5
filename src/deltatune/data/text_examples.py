"""Examples of raw text and labelled text: continued pre-training blocks and classification examples.

Continued pre-training cuts concatenated documents into blocks where every token trains. A
classification example puts its class id at the *last* token's label position (everything
else IGNORE_INDEX), so the training loop's count of label positions per step counts examples.
"""

from __future__ import annotations

from deltatune.data.examples import IGNORE_INDEX, DatasetStats, Example
from deltatune.data.formats import Record
from deltatune.errors import UserError

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
