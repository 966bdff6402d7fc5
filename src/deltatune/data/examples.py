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
Examples of raw and labelled text are built in text_examples.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from deltatune.data.formats import Record
from deltatune.data.reasoning import THINK_CLOSE, THINK_OPEN, answers_only, fold_reasoning
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


def renders_reasoning(tokenizer) -> bool:
    """Whether the chat template renders an assistant message's `reasoning_content` field at all."""
    probe = [PROBE[0], {**PROBE[1], "reasoning_content": "zqxj"}]
    try:
        return "zqxj" in render(tokenizer, probe)
    except Exception:  # a template that refuses the probe does not render the field either
        return False


def tokenize_conversation(tokenizer, messages: list[dict], *, train_on_inputs: bool = False, source: str = "",
                          first: int = 0, trailer: str = "", tools: list[dict] | None = None,
                          fold: bool = False, train_on_reasoning: bool = True) -> list[Example]:
    """Token ids and labels of a conversation (not yet truncated): one Example, or one per assistant turn
    where the template rewrites the history (`trained_renderings`); assistant turns before index
    `first` are not trained. `fold`: reasoning_content goes into the content as a `<think>` block (for
    templates that do not render the field); `train_on_reasoning` false: only the answer after each
    turn's `</think>`, and its end-of-turn token, are trained."""
    texts = conversation_texts(tokenizer, messages, source=source, first=first, trailer=trailer, tools=tools,
                               fold=fold, train_on_reasoning=train_on_reasoning)
    encoded = [tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) for text, _ in texts]
    return [labelled(enc["input_ids"], enc["offset_mapping"], spans, source, train_on_inputs)
            for enc, (_, spans) in zip(encoded, texts)]


def conversation_texts(tokenizer, messages: list[dict], *, source: str = "", first: int = 0, trailer: str = "",
                       tools: list[dict] | None = None, fold: bool = False, train_on_reasoning: bool = True
                       ) -> list[tuple[str, list[tuple[int, int]]]]:
    """tokenize_conversation's texts and the character spans it trains, before tokenising."""
    if fold:
        messages = fold_reasoning(messages)
    texts = trained_renderings(tokenizer, messages, source, first, trailer, tools)
    if train_on_reasoning:
        return texts
    if any(m.get("reasoning_content") for m in messages) and any(THINK_CLOSE not in text for text, _ in texts):
        raise UserError(f"{source}: the chat template renders reasoning_content without {THINK_OPEN} tags, "
                        "so it cannot be left untrained (set reasoning_format: think)")
    return [(text, answers_only(text, spans, source)) for text, spans in texts]


def labelled(ids, offsets, spans: list[tuple[int, int]], source: str, train_on_inputs: bool = False) -> Example:
    """An encoded text as an Example: its tokens in the spans trained (every token with train_on_inputs)."""
    ids = list(ids)
    return Example(ids, list(ids) if train_on_inputs else labels_in_spans(ids, offsets, spans), source)


def labels_in_spans(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where the token starts inside one of the (ascending) spans, IGNORE_INDEX elsewhere.
    One walk over tokens and spans together; a token that starts before its predecessor restarts the walk."""
    labels = [IGNORE_INDEX] * len(ids)
    k, previous = 0, -1
    for t, (start, _end) in enumerate(offsets):
        if start < previous:
            k = 0
        previous = start
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k < len(spans) and spans[k][0] <= start:
            labels[t] = ids[t]
    return labels


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


BATCH = 256  # conversations tokenised in one call: the tokenizer's per-call cost is paid once for them all


def build_sft_examples(records: list[Record], tokenizer, *, max_seq_length: int, train_on_inputs: bool = False,
                       name: str = "data", progress=None, reasoning_format: str = "auto",
                       train_on_reasoning: bool = True, require_examples: bool = True
                       ) -> tuple[list[Example], DatasetStats]:
    """Tokenise, mask, truncate; drop (and count) examples left with no trained token.
    `progress(n)`, when given, is told of every record done. `reasoning_format`: `template` passes
    reasoning_content to the template, `think` folds it into a `<think>` block, `auto` folds it only for
    templates that do not render the field."""
    stats = DatasetStats()
    make = sft_example_maker(tokenizer, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs,
                             reasoning_format=reasoning_format, train_on_reasoning=train_on_reasoning)
    examples = []
    for start in range(0, len(records), BATCH):
        batch = records[start:start + BATCH]
        examples += make(batch, stats)
        if progress is not None:
            progress(len(batch))
    if stats.turn_by_turn:
        stats.notes.append(turn_by_turn_note(stats.turn_by_turn))
    if not examples and require_examples:
        raise no_examples_left(name, max_seq_length)
    return examples, stats


def sft_example_maker(tokenizer, *, max_seq_length: int, train_on_inputs: bool = False, reasoning_format: str = "auto",
                      train_on_reasoning: bool = True) -> Callable[[list[Record], DatasetStats], list[Example]]:
    """make(records, stats): the records' examples (tokenised in one call), truncated, those with no trained
    token dropped, and counted in `stats`; what the template does is learned once, here, not per record."""
    check_chat_tokenizer(tokenizer)
    trailer = trailing_text(tokenizer)
    fold = reasoning_format == "think" or (reasoning_format == "auto" and not renders_reasoning(tokenizer))

    def texts_of(record: Record) -> list[tuple[str, list[tuple[int, int]]]]:
        if not record.messages:
            raise UserError(f"{record.source}: record has no conversation; task 'sft' needs chat records "
                            "(messages, conversations, instruction/output or prompt/completion)")
        return conversation_texts(tokenizer, record.messages, source=record.source, trailer=trailer,
                                  tools=record.tools, fold=fold, train_on_reasoning=train_on_reasoning)

    def make(records: list[Record], stats: DatasetStats) -> list[Example]:
        texts = [texts_of(record) for record in records]
        flat = [text for turns in texts for text, _ in turns]
        enc = tokenizer(flat, add_special_tokens=False, return_offsets_mapping=True) if flat else {}
        encoded = iter(zip(enc.get("input_ids", []), enc.get("offset_mapping", [])))
        kept = []
        for record, turns in zip(records, texts):
            stats.turn_by_turn += len(turns) > 1
            for _, spans in turns:
                ex = labelled(*next(encoded), spans, record.source, train_on_inputs)
                kept += keep_trainable(ex, max_seq_length, stats)
        return kept
    return make


def keep_trainable(ex: Example, max_seq_length: int, stats: DatasetStats) -> list[Example]:
    """[the example, truncated to max_seq_length], or [] when no trained token is left; counted in `stats`."""
    if len(ex.input_ids) > max_seq_length:
        stats.truncated += 1
        ex = Example(ex.input_ids[:max_seq_length], ex.labels[:max_seq_length], ex.source)
    n_labels = sum(1 for x in ex.labels[1:] if x != IGNORE_INDEX)  # position 0 is never predicted
    if n_labels == 0:
        stats.dropped_no_labels += 1
        return []
    stats.label_tokens += n_labels
    stats.tokens += len(ex.input_ids)
    stats.examples += 1
    return [ex]


def no_examples_left(name: str, max_seq_length: int) -> UserError:
    return UserError(f"{name}: every example lost all its trained tokens to truncation at "
                     f"max_seq_length={max_seq_length} (raise max_seq_length or shorten the prompts)")


def held_out_count(n_records: int, fraction: float) -> int:
    """How many of a file's records split_records holds out: at least one, unless there is nothing to spare."""
    return 0 if fraction <= 0 or n_records < 2 else max(1, round(n_records * fraction))


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded hold-out: the same seed and file always give the same split."""
    n_val = held_out_count(len(records), fraction)
    if n_val == 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
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
