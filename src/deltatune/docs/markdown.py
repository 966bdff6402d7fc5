"""Markdown -> blocks: ATX and setext headings, fenced code, pipe tables, lists, definition lists, paragraphs."""

from __future__ import annotations

import re

from deltatune.docs.documents import Block, definition_of, flatten_table, join_lines, strip_inline_markdown

_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_LIST = re.compile(r"^\s*([-*+]|\d+[.)])\s+")
_MD_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_FENCES = ("```", "~~~")


def _split_table_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [strip_inline_markdown(c.strip()) for c in line.split("|")]


def _content_lines(text: str) -> list[str]:
    """The lines without YAML front matter (metadata, not content) and HTML comments."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
        if end is not None:
            lines = lines[end + 1:]
    text = re.sub(r"<!--.*?-->", "", "\n".join(lines), flags=re.DOTALL)
    return text.splitlines()


def _is_setext_heading(lines: list[str], i: int) -> bool:
    line = lines[i]
    return i + 1 < len(lines) and bool(re.match(r"^\s*(=+|-+)\s*$", lines[i + 1])) and not _MD_LIST.match(line) \
        and "|" not in line


def _is_table(lines: list[str], i: int) -> bool:
    return "|" in lines[i] and i + 1 < len(lines) and bool(_MD_TABLE_RULE.match(lines[i + 1]))


# Each reader below takes the block starting at lines[i], appends it to `blocks` and returns the next line's index.

def _fenced_code(lines: list[str], i: int, blocks: list[Block]) -> int:
    fence = lines[i].lstrip()[:3]
    body = []
    i += 1
    while i < len(lines) and not lines[i].lstrip().startswith(fence):
        body.append(lines[i])
        i += 1
    i += 1
    if any(b.strip() for b in body):
        blocks.append(Block("code", "\n".join(body).strip("\n")))
    return i


def _table(lines: list[str], i: int, blocks: list[Block]) -> int:
    header = _split_table_row(lines[i])
    rows = []
    i += 2
    while i < len(lines) and "|" in lines[i] and lines[i].strip():
        rows.append(_split_table_row(lines[i]))
        i += 1
    blocks.append(Block("table", flatten_table(rows, header)))
    return i


def _list(lines: list[str], i: int, blocks: list[Block]) -> int:
    items: list[str] = []
    while i < len(lines) and lines[i].strip():
        if _MD_LIST.match(lines[i]):
            items.append(_MD_LIST.sub("", lines[i], count=1))
        elif items:
            items[-1] += "\n" + lines[i]  # a wrapped item continues on an indented line
        else:
            break
        i += 1
    items = [join_lines(it.split("\n")) for it in items]
    definitions = [d for d in (definition_of(it) for it in items) if d]
    blocks.append(Block("list", "\n".join("- " + strip_inline_markdown(it) for it in items),
                        definitions=definitions))
    return i


def _paragraph(lines: list[str], i: int, blocks: list[Block]) -> int:
    para = []
    while i < len(lines) and lines[i].strip() and not _MD_HEADING.match(lines[i]) \
            and not lines[i].lstrip().startswith(_FENCES) and not (para and _MD_LIST.match(lines[i])):
        if lines[i].lstrip().startswith(": ") and para:
            # Markdown Extra definition list: "Term" then ": meaning".
            meaning = strip_inline_markdown(lines[i].lstrip()[2:].strip())
            term = strip_inline_markdown(join_lines(para))
            blocks.append(Block("paragraph", f"{term}: {meaning}", definitions=[(term, meaning)]))
            para = []
            i += 1
            continue
        para.append(lines[i])
        i += 1
    if para:
        blocks.append(Block("paragraph", strip_inline_markdown(join_lines(para))))
    return i


def markdown_blocks(text: str) -> list[Block]:
    lines = _content_lines(text)
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = _MD_HEADING.match(line)
        if not line.strip():
            i += 1
        elif line.lstrip().startswith(_FENCES):
            i = _fenced_code(lines, i, blocks)
        elif heading:
            blocks.append(Block("heading", strip_inline_markdown(heading.group(2)), level=len(heading.group(1))))
            i += 1
        elif _is_setext_heading(lines, i):
            level = 1 if lines[i + 1].strip().startswith("=") else 2
            blocks.append(Block("heading", strip_inline_markdown(line.strip()), level=level))
            i += 2
        elif _is_table(lines, i):
            i = _table(lines, i, blocks)
        elif _MD_LIST.match(line):
            i = _list(lines, i, blocks)
        else:
            i = _paragraph(lines, i, blocks)
    return blocks
