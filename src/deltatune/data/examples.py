"""From canonical records to examples: token ids and the labels the loss counts.

The label mask is the heart of SFT: the loss must count the assistant's tokens only,
including each turn's end-of-turn token (or the tuned model never learns to stop). We derive
the trained spans by *rendering* the conversation with the tokenizer's own chat template:
the text added by each assistant turn is the difference between the conversation rendered
up to that turn and the same prefix rendered with the generation prompt. No marker strings
are searched for. Text a template appends after the last message (Phi-3's end-of-text) is
found by rendering too and never trained; a template that rewrites earlier turns as the
conversation grows (Qwen3's dropped reasoning) is trained turn by turn, each assistant turn as
the model sees it when generating it (`trained_renderings`).

A preference pair renders each side (the shared prompt plus one response) the same way and
trains each side's response only; the chosen side's Example carries the rejected one.

Continued pre-training cuts concatenated documents into blocks where every token trains. A
classification example puts its class id at the *last* token's label position (everything
else IGNORE_INDEX), so the training loop's count of label positions per step counts examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from deltatune.data.formats import Record
from deltatune.data.tools import without_calls
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
    # A preference pair: this example is the chosen side, `rejected` the other; the two travel together.
    rejected: "Example | None" = None
    # The reference model's summed log-probability of this side's labels, where it is computed before
    # training (a preference run that has no adapters to switch off).
    reference_logp: float | None = None


@dataclass
class DatasetStats:
    examples: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    label_tokens: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)
    turn_by_turn: int = 0  # conversations trained one example per assistant turn

    @classmethod
    def merged(cls, parts: list["DatasetStats"]) -> "DatasetStats":
        """The stats of the parts' examples together (data prepared in chunks)."""
        total = cls(**{f: sum(getattr(p, f) for p in parts) for f in
                       ("examples", "truncated", "dropped_no_labels", "label_tokens", "tokens", "turn_by_turn")})
        total.notes = [turn_by_turn_note(total.turn_by_turn)] if total.turn_by_turn else []
        return total


def turn_by_turn_note(count: int) -> str:
    return (f"{count} conversations were trained turn by turn, one example per assistant turn "
            "(the chat template rewrites earlier turns as the conversation grows)")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


# A two-turn conversation rendered to learn what the template appends after the last message.
PROBE = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def trailing_text(tokenizer) -> str:
    """What the chat template appends after the last message when no generation prompt is asked for
    (Phi-3's end-of-text token; nothing for most templates), found by rendering: the tokens where a
    conversation and the same conversation continued by one more user turn part ways."""
    try:
        alone = render(tokenizer, PROBE)
        continued = render(tokenizer, PROBE + [{"role": "user", "content": "c"}])
    except Exception:  # a template that refuses the probe (a required system turn...): assume nothing trails
        return ""
    enc = tokenizer(alone, add_special_tokens=False, return_offsets_mapping=True)
    ids, more = enc["input_ids"], tokenizer(continued, add_special_tokens=False)["input_ids"]
    same = next((k for k, (a, b) in enumerate(zip(ids, more)) if a != b), min(len(ids), len(more)))
    return alone[enc["offset_mapping"][same][0]:] if same < len(ids) else ""


def trained_renderings(tokenizer, messages: list[dict], source: str = "", first: int = 0, trailer: str = "",
                       tools: list[dict] | None = None) -> list[tuple[str, list[tuple[int, int]]]]:
    """[(text, the [start, end) character spans the loss covers)] of a conversation.

    Each span is the text an assistant turn adds (its content and end-of-turn token), with the
    template's trailing whitespace left out; text the template appends after the last message
    (`trailer`, from `trailing_text`) stays in the text but is never trained. Only turns from index
    `first` on are trained (a preference pair trains its response, not the prompt's earlier answers).

    A template that renders every prefix of the conversation as a prefix of the whole gives one
    text with a span per assistant turn. One that rewrites the history as the conversation grows
    (Qwen3 and DeepSeek-R1 drop the reasoning of turns before the last user message) gives one
    text per assistant turn instead: the turn as the model sees it when it generates it, its prompt
    the history rendered for generation, its target the turn with its reasoning and end-of-turn token.
    `tools`: the function definitions the conversation may call, rendered by the template; an
    assistant turn that calls tools is trained like any other, a tool result never is.
    """
    def without_trailer(text: str) -> str:
        return text[: len(text) - len(trailer)] if trailer and text.endswith(trailer) else text

    full = render(tokenizer, messages, tools=tools)
    if any(m.get("tool_calls") for m in messages) and render(tokenizer, without_calls(messages), tools=tools) == full:
        raise UserError(f"{source}: the model's chat template does not render tool calls (the conversation renders "
                        "the same without them); use a template with tool support (chat_template: qwen3, or your "
                        "own Jinja file)")
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else ""
        text = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], tools=tools)
        upto = without_trailer(text)
        if not upto.startswith(before):
            raise UserError(
                f"{source}: the model's chat template does not render assistant turn {i} after its own generation "
                "prompt, so the turn's tokens cannot be located (use another chat_template, or set "
                "train_on_inputs: true)")
        turns.append((len(before), len(upto.rstrip()), text))
    if all(full.startswith(text[:end]) for _, end, text in turns):
        return [(full, [(start, end) for start, end, _ in turns])]
    return [(text, [(start, end)]) for start, end, text in turns]


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_FORMATS = ("auto", "template", "think")


def renders_reasoning(tokenizer) -> bool:
    """Whether the chat template renders an assistant message's `reasoning_content` field at all."""
    probe = [PROBE[0], {**PROBE[1], "reasoning_content": "zqxj"}]
    try:
        return "zqxj" in render(tokenizer, probe)
    except Exception:  # a template that refuses the probe does not render the field either
        return False


def fold_reasoning(messages: list[dict]) -> list[dict]:
    """`reasoning_content` moved into the content as a `<think>` block, the way reasoning models write it."""
    out = []
    for m in messages:
        if m.get("reasoning_content"):
            folded = {k: v for k, v in m.items() if k != "reasoning_content"}
            # A tool-calling turn may have no content: the block is then all its text.
            folded["content"] = f"{THINK_OPEN}\n{m['reasoning_content']}\n{THINK_CLOSE}\n\n{m.get('content') or ''}"
            m = folded
        out.append(m)
    return out


def answers_only(text: str, spans: list[tuple[int, int]], source: str) -> list[tuple[int, int]]:
    """The spans with each turn's reasoning (up to its `</think>` and the whitespace after) left untrained."""
    out = []
    for start, end in spans:
        close = text.find(THINK_CLOSE, start, end)
        if close < 0 and THINK_OPEN in text[start:end]:
            raise UserError(f"{source}: an assistant turn opens {THINK_OPEN} and never closes it, so its reasoning "
                            "cannot be told from its answer (train_on_reasoning: false)")
        if close >= 0:
            start = close + len(THINK_CLOSE)
            start += len(text[start:end]) - len(text[start:end].lstrip())
        out.append((start, end))
    return out


def tokenize_conversation(tokenizer, messages: list[dict], *, train_on_inputs: bool = False, source: str = "",
                          first: int = 0, trailer: str = "", tools: list[dict] | None = None,
                          fold: bool = False, train_on_reasoning: bool = True) -> list[Example]:
    """Token ids and labels of a conversation (not yet truncated): one Example, or one per assistant turn
    where the template rewrites the history (`trained_renderings`); assistant turns before index
    `first` are not trained. `fold`: reasoning_content goes into the content as a `<think>` block (for
    templates that do not render the field); `train_on_reasoning` false: only the answer after each
    turn's `</think>`, and its end-of-turn token, are trained."""
    if fold:
        messages = fold_reasoning(messages)
    examples = []
    for text, spans in trained_renderings(tokenizer, messages, source, first, trailer, tools):
        if not train_on_reasoning:
            if any(m.get("reasoning_content") for m in messages) and THINK_CLOSE not in text:
                raise UserError(f"{source}: the chat template renders reasoning_content without {THINK_OPEN} tags, "
                                "so it cannot be left untrained (set reasoning_format: think)")
            spans = answers_only(text, spans, source)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if train_on_inputs:
            examples.append(Example(ids, list(ids), source))
            continue
        labels = [IGNORE_INDEX] * len(ids)
        for t, (start, _end) in enumerate(enc["offset_mapping"]):
            if any(s <= start < e for s, e in spans):
                labels[t] = ids[t]
        examples.append(Example(ids, labels, source))
    return examples


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the chat template (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, ...): the last trained token of a rendered probe conversation. None when the
    template ends a turn with ordinary text, or cannot render the probe."""
    try:
        examples = tokenize_conversation(tokenizer, PROBE, trailer=trailing_text(tokenizer))
    except Exception:  # a template that refuses the probe: there is nothing to learn from it
        return None
    trained = [t for t, label in zip(examples[-1].input_ids, examples[-1].labels) if label != IGNORE_INDEX]
    added = tokenizer.added_tokens_decoder
    return trained[-1] if trained and trained[-1] in added and added[trained[-1]].special else None


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation up to (not including) its last assistant turn, ready to generate."""
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    text = render(tokenizer, history, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_chat_tokenizer(tokenizer) -> None:
    """Masking by rendering needs a chat template and token offsets."""
    if tokenizer.chat_template is None:
        raise UserError("the tokenizer has no chat template (the model loader sets ChatML; this is a bug)")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("the tokenizer is not a fast (Rust) tokenizer, so token offsets are unavailable "
                        "(provide tokenizer.json with the model)")


def build_sft_examples(records: list[Record], tokenizer, *, max_seq_length: int, train_on_inputs: bool = False,
                       name: str = "data", progress=None, reasoning_format: str = "auto",
                       train_on_reasoning: bool = True, require_examples: bool = True
                       ) -> tuple[list[Example], DatasetStats]:
    """Tokenise, mask, truncate; drop (and count) examples left with no trained token.
    `progress(n)`, when given, is told of every record done. `reasoning_format`: `template` passes
    reasoning_content to the template, `think` folds it into a `<think>` block, `auto` folds it only for
    templates that do not render the field."""
    check_chat_tokenizer(tokenizer)
    trailer = trailing_text(tokenizer)
    fold = reasoning_format == "think" or (reasoning_format == "auto" and not renders_reasoning(tokenizer))
    stats = DatasetStats()
    examples = []
    split = 0  # conversations trained turn by turn (a template that rewrites the history)
    for record in records:
        if progress is not None:
            progress(1)
        if not record.messages:
            raise UserError(f"{record.source}: record has no conversation; task 'sft' needs chat records "
                            "(messages, conversations, instruction/output or prompt/completion)")
        turns = tokenize_conversation(tokenizer, record.messages, train_on_inputs=train_on_inputs,
                                      source=record.source, trailer=trailer, tools=record.tools, fold=fold,
                                      train_on_reasoning=train_on_reasoning)
        split += len(turns) > 1
        for ex in turns:
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
    stats.turn_by_turn = split
    if split:
        stats.notes.append(turn_by_turn_note(split))
    if not examples and require_examples:
        raise no_examples_left(name, max_seq_length)
    return examples, stats


def no_examples_left(name: str, max_seq_length: int) -> UserError:
    return UserError(f"{name}: every example lost all its trained tokens to truncation at "
                     f"max_seq_length={max_seq_length} (raise max_seq_length or shorten the prompts)")


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded hold-out: the same seed and file always give the same split."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * fraction))
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# --- preference pairs ------------------------------------------------------------------------

def tokenize_pair(tokenizer, record: Record, trailer: str = "") -> Example:
    """Both sides of a pair rendered with the chat template, each trained on its response only (the
    same span rule as SFT); the chosen side's Example carries the rejected one."""
    first = len(record.messages)
    sides = [tokenize_conversation(tokenizer, record.messages + side, source=record.source, first=first,
                                   trailer=trailer) for side in (record.chosen, record.rejected)]
    if any(len(side) > 1 for side in sides):
        raise UserError(f"{record.source}: a response of several assistant turns, with a chat template that "
                        "rewrites earlier turns, has no single rendering to compare (give one assistant turn "
                        "per response)")
    (chosen,), (rejected,) = sides
    chosen.rejected = rejected
    return chosen


def truncate_pair(pair: Example, max_seq_length: int) -> tuple[Example, bool, bool]:
    """(the pair within max_seq_length, prompt tokens dropped, responses cut).

    The rule: a pair longer than max_seq_length first loses prompt tokens from the left (the
    start of a long conversation matters least to the answer), keeping at least one, which the
    first response token is predicted from; if it is still too long, both responses are cut at
    the same length. Both sides lose the same prompt tokens, so they still answer the same prompt.
    """
    sides = [pair, pair.rejected]
    longest = max(len(s.input_ids) for s in sides)
    if longest <= max_seq_length:
        return pair, False, False
    prompt = min(next((i for i, x in enumerate(s.labels) if x != IGNORE_INDEX), len(s.labels)) for s in sides)
    drop = min(longest - max_seq_length, prompt - 1)
    cut = [Example(s.input_ids[drop:][:max_seq_length], s.labels[drop:][:max_seq_length], s.source) for s in sides]
    cut[0].rejected = cut[1]
    return cut[0], drop > 0, longest - drop > max_seq_length


def build_preference_examples(records: list[Record], tokenizer, *, max_seq_length: int, name: str = "data",
                              progress=None) -> tuple[list[Example], DatasetStats]:
    """One Example per pair (chosen side, carrying the rejected side); truncated by `truncate_pair`'s rule,
    and pairs left with an untrained side dropped and counted."""
    check_chat_tokenizer(tokenizer)
    trailer = trailing_text(tokenizer)
    stats = DatasetStats()
    examples = []
    prompt_cut = response_cut = 0
    for record in records:
        if progress is not None:
            progress(1)
        if record.chosen is None:
            raise UserError(f"{record.source}: record is not a preference pair; task 'preference' needs "
                            "{\"prompt\", \"chosen\", \"rejected\"} records")
        pair, lost_prompt, lost_response = truncate_pair(tokenize_pair(tokenizer, record, trailer), max_seq_length)
        stats.truncated += lost_prompt or lost_response
        prompt_cut += lost_prompt
        response_cut += lost_response
        sides = (pair, pair.rejected)
        n_labels = [sum(1 for x in s.labels[1:] if x != IGNORE_INDEX) for s in sides]
        if min(n_labels) == 0:
            stats.dropped_no_labels += 1
            continue
        stats.label_tokens += sum(n_labels)
        stats.tokens += sum(len(s.input_ids) for s in sides)
        examples.append(pair)
    stats.examples = len(examples)
    if stats.truncated:
        stats.notes.append(f"{prompt_cut} pairs lost prompt tokens from the left and {response_cut} had both "
                           f"responses cut, to fit max_seq_length={max_seq_length}")
    if not examples:
        raise UserError(f"{name}: every pair lost a response to truncation at max_seq_length={max_seq_length} "
                        "(raise max_seq_length or shorten the prompts)")
    return examples, stats


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
