"""The structured form of a document, and the small text helpers every reader shares.

Every reader (pdf.py, markdown.py, html.py, and plain text in read.py) produces the same thing: a
list of `Block`s (headings, paragraphs, lists, tables, code) that know their page and heading path.
The cleaned document text is the blocks joined by blank lines, and every block and chunk records
its [start, end) character span in that text, so `document.text[start:end] == chunk.text` always
holds and a user can find any training pair's origin.

Imports inside deltatune.docs point one way: this module at the bottom, the readers and
chunking.py on it, read.py (`read_document`, `find_documents`) on the readers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Block:
    kind: str  # heading | paragraph | list | table | code
    text: str
    page: int | None = None  # 1-based, PDF and form-feed text only
    level: int = 0  # heading level
    heading_path: tuple[str, ...] = ()
    definitions: list[tuple[str, str]] = field(default_factory=list)  # (term, definition) pairs found here
    start: int = 0  # character span in Document.text
    end: int = 0


@dataclass
class Document:
    path: Path
    kind: str
    title: str
    blocks: list[Block]
    text: str = ""
    removed_lines: int = 0  # header/footer lines dropped
    label: str | None = None  # class name, for --label-from folder


@dataclass
class Chunk:
    text: str
    file: str
    page: int | None
    heading_path: tuple[str, ...]
    start: int
    end: int
    tokens: int
    definitions: list[tuple[str, str]] = field(default_factory=list)
    label: str | None = None

    def provenance(self) -> dict:
        out = {"file": self.file, "page": self.page, "heading_path": list(self.heading_path),
               "span": [self.start, self.end]}
        return out


# --- small text cleaners shared by every reader -----------------------------------------------

_HYPHEN_BREAK = re.compile(r"(\w)-\n(?=[a-z])")  # "config-\nuration": a word broken at a line end


def join_lines(lines: list[str]) -> str:
    """Lines of one paragraph -> one line: undo hyphenation at line breaks, collapse whitespace."""
    text = "\n".join(line.strip() for line in lines if line.strip())
    text = _HYPHEN_BREAK.sub(r"\1", text)
    return " ".join(text.split())


def squash(text: str) -> str:
    return " ".join(text.split())


def _digits_to_hash(line: str) -> str:
    # Page numbers differ from page to page; "Page 3 of 9" and "Page 4 of 9" are the same footer.
    return re.sub(r"\d+", "#", squash(line)).lower()


def repeated_margin_lines(pages: list[list[str | None]], margin: int = 2) -> set[str]:
    """Normalised lines that sit in the top or bottom `margin` lines of most pages: headers and footers.

    A line given as None is content that can never be a header (a heading); it still takes its place.
    """
    if len(pages) < 2:
        return set()
    seen: Counter[str] = Counter()
    for lines in pages:
        lines = [line for line in lines if line is None or line.strip()]
        edge = lines[:margin] + lines[-margin:] if len(lines) > margin else lines
        seen.update({_digits_to_hash(line) for line in edge if line is not None})
    need = max(2, math.ceil(0.8 * len(pages)))  # "every page", forgiving a title page or two
    return {line for line, count in seen.items() if count >= need}


def margin_drops(lines: list[str | None], repeated: set[str], margin: int = 2) -> set[int]:
    """Indices of repeated header/footer lines, looking only at the page's first and last lines."""
    content = [i for i, line in enumerate(lines) if line is None or line.strip()]
    edge = set(content[:margin] + content[-margin:])
    return {i for i in edge if lines[i] is not None and _digits_to_hash(lines[i]) in repeated}


# --- inline markup, definitions and tables (Markdown and HTML) ---------------------------------

_DEFINITION = re.compile(r"^(?:\*\*(?P<b>[^*]{1,80})\*\*|`(?P<c>[^`]{1,80})`|(?P<p>[A-Z][\w .()/-]{0,60}?))"
                         r"\s*(?::|—|–| - )\s*(?P<d>\S.*)$")


def strip_inline_markdown(text: str) -> str:
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)  # images -> alt text
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # links -> their text
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<![\w*])[*_](\S.*?)[*_](?![\w*])", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    return text


def definition_of(item: str) -> tuple[str, str] | None:
    """`**Term**: meaning`, `` `term` — meaning `` or `Term: meaning` -> (term, meaning)."""
    match = _DEFINITION.match(item.strip())
    if not match:
        return None
    term = match.group("b") or match.group("c") or match.group("p")
    meaning = strip_inline_markdown(match.group("d")).strip()
    if not term or len(meaning.split()) < 2:
        return None
    return term.strip(), meaning


def flatten_table(rows: list[list[str]], header: list[str] | None) -> str:
    """A table as readable lines: `Column: value; Column: value` per row, or `a | b` without a header."""
    out = []
    for row in rows:
        cells = [squash(c) for c in row]
        if header and len(header) == len(cells):
            out.append("; ".join(f"{h}: {c}" for h, c in zip(header, cells) if c))
        elif any(cells):
            out.append(" | ".join(cells))
    return "\n".join(out)


# --- documents --------------------------------------------------------------------------------

def assemble(doc: Document) -> Document:
    """Give every block its heading path and its span in the cleaned text."""
    path: list[tuple[int, str]] = []
    parts, pos = [], 0
    for block in doc.blocks:
        if block.kind == "heading":
            path = [(lvl, t) for lvl, t in path if lvl < block.level] + [(block.level, block.text)]
        block.heading_path = tuple(t for _, t in path)
        if parts:
            pos += 2
        block.start, block.end = pos, pos + len(block.text)
        parts.append(block.text)
        pos = block.end
    doc.text = "\n\n".join(parts)
    if not doc.title:
        first = next((b for b in doc.blocks if b.kind == "heading" and b.level == 1), None)
        doc.title = first.text if first else doc.path.stem.replace("_", " ").replace("-", " ")
    return doc
