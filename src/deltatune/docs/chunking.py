"""Cut a Document into Chunks that fit the target model's token budget.

Chunks follow the structure: they never cross a heading, they pack whole blocks while the
target model's tokenizer counts no more than `max_tokens`, and only a block too long on its own
is split (by lines, then sentences, then token windows).
"""

from __future__ import annotations

import re

from deltatune.docs.documents import Block, Chunk, Document
from deltatune.errors import UserError


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def _split_span(text: str, start: int, end: int, tokenizer, max_tokens: int) -> list[tuple[int, int]]:
    """Cut text[start:end] into spans that each fit: at lines, then sentences, then token windows."""
    piece = text[start:end]
    if count_tokens(tokenizer, piece) <= max_tokens:
        return [(start, end)]
    for pattern in (re.compile(r"\n+"), _SENTENCE_END):
        cuts = [m for m in pattern.finditer(piece)]
        if cuts:
            spans, s = [], 0
            for m in cuts:
                spans.append((start + s, start + m.start()))
                s = m.end()
            spans.append((start + s, end))
            out = []
            for a, b in spans:
                if b > a:
                    out.extend(_split_span(text, a, b, tokenizer, max_tokens))
            return out
    # One long run-on sentence: cut at token boundaries, backing up to whitespace where there is some.
    enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    out, first = [], 0
    while first < len(offsets):
        last = min(first + max_tokens, len(offsets))
        a = offsets[first][0]
        b = offsets[last - 1][1] if last == len(offsets) else offsets[last][0]
        space = piece.rfind(" ", a + 1, b)
        if last < len(offsets) and space > a:
            b = space
        while last < len(offsets) and offsets[last][0] < b:
            last += 1
        while last > first + 1 and offsets[last - 1][0] >= b:
            last -= 1
        seg = piece[a:b].strip()
        if seg:
            lead = piece[a:b].index(seg[0])
            out.append((start + a + lead, start + a + lead + len(seg)))
        first = last
    return out


def chunk_document(doc: Document, tokenizer, max_tokens: int) -> list[Chunk]:
    """Pack consecutive blocks of one section into chunks of at most `max_tokens` tokens."""
    if max_tokens < 8:
        raise UserError(f"--max-tokens {max_tokens} is too small for a useful chunk (use 64 or more)")
    chunks: list[Chunk] = []
    current: list[tuple[int, int, Block]] = []
    defined: set[int] = set()  # blocks whose definitions went to a chunk already

    def emit():
        if not current:
            return
        start, end = current[0][0], current[-1][1]
        body = doc.text[start:end]
        # A split block's definitions go with its first piece, once.
        definitions = []
        for _, _, block in current:
            if id(block) not in defined:
                defined.add(id(block))
                definitions.extend(block.definitions)
        chunks.append(Chunk(body, str(doc.path), current[0][2].page, current[0][2].heading_path, start, end,
                            count_tokens(tokenizer, body), definitions, doc.label))
        current.clear()

    for block in doc.blocks:
        if block.kind == "heading":
            emit()
            continue
        for a, b in _split_span(doc.text, block.start, block.end, tokenizer, max_tokens):
            if current:
                candidate = doc.text[current[0][0]:b]
                if count_tokens(tokenizer, candidate) > max_tokens:
                    emit()
            current.append((a, b, block))
    emit()
    return chunks
