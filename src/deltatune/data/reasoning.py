"""Reasoning in chat records: `reasoning_content` folded into a `<think>` block, and the answer told from it."""

from __future__ import annotations

from deltatune.errors import UserError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
