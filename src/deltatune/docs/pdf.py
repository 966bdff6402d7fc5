"""PDF -> blocks (pypdf): headings by font size, paragraphs by line spacing, running headers and footers dropped."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from deltatune.docs.documents import Block, join_lines, margin_drops, repeated_margin_lines, squash
from deltatune.errors import UserError

_PAGE_NUMBER = re.compile(r"^\s*(page\s*)?\d+(\s*(/|of)\s*\d+)?\s*$", re.IGNORECASE)


@dataclass
class _PdfLine:
    text: str
    y: float
    size: float


def _pdf_page_lines(page) -> list[_PdfLine]:
    """Text lines of a page in content order, with baseline height and font size (pypdf visitor)."""
    lines: list[_PdfLine] = []

    def visit(text, cm, tm, _font, font_size):
        if not text.strip():
            return
        # Effective position and size: the text matrix in user space (times the CTM).
        y = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]
        size = abs(font_size * math.hypot(tm[2], tm[3]) * (math.hypot(cm[2], cm[3]) or 1.0))
        for part in text.split("\n"):
            if not part.strip():
                continue
            if lines and abs(lines[-1].y - y) < 0.5 * max(size, 1.0) and not text.startswith("\n"):
                lines[-1].text += part  # the same line drawn by several operators
            else:
                lines.append(_PdfLine(part, y, size))

    page.extract_text(visitor_text=visit)
    return [line for line in lines if line.text.strip()]


def _read_pages(path: Path) -> list[list[_PdfLine]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        return [_pdf_page_lines(p) for p in reader.pages]
    except (PdfReadError, OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: cannot read this PDF ({type(err).__name__}: {err})") from None


def _body_size(pages: list[list[_PdfLine]]) -> float | None:
    """The font size that sets the most characters; None for a PDF without text."""
    sizes: Counter[float] = Counter()
    for lines in pages:
        for line in lines:
            sizes[round(line.size, 1)] += len(line.text)
    if not sizes:
        return None
    return sizes.most_common(1)[0][0]


def _drop_margins(pages: list[list[_PdfLine]], body: float) -> tuple[list[list[_PdfLine]], int]:
    """Pages without their repeated headers/footers and trailing page numbers, and how many lines went."""

    # Text set larger than the body is a heading, never a running header ("Chapter 2" at the top of a page).
    def margin_text(lines):
        return [line.text if line.size < body * 1.15 else None for line in lines]

    repeated = repeated_margin_lines([margin_text(p) for p in pages])
    removed = 0
    kept_pages = []
    for lines in pages:
        drop = margin_drops(margin_text(lines), repeated)
        removed += len(drop)
        kept = [line for i, line in enumerate(lines) if i not in drop]
        # A bare page number at the page's edge is a footer even when it is not repeated text.
        while kept and _PAGE_NUMBER.match(kept[-1].text):
            kept.pop()
            removed += 1
        kept_pages.append(kept)
    return kept_pages, removed


def _line_spacing(pages: list[list[_PdfLine]], body: float) -> float:
    gaps = sorted(a.y - b.y for p in pages for a, b in zip(p, p[1:])
                  if 0 < a.y - b.y and abs(a.size - body) < 0.5 and abs(b.size - body) < 0.5)
    # Most gaps are line spacing, paragraph gaps are the minority: the lower quartile is the line spacing.
    return gaps[len(gaps) // 4] if gaps else body * 1.2


def _page_blocks(pages: list[list[_PdfLine]], heading_sizes: list[float], spacing: float) -> list[Block]:
    """Lines -> headings (by size, largest first) and paragraphs (split at size changes and wide gaps)."""
    blocks: list[Block] = []
    para: list[str] = []
    para_page = None

    def flush():
        nonlocal para
        if para:
            blocks.append(Block("paragraph", join_lines(para), page=para_page))
        para = []

    for number, lines in enumerate(pages, start=1):
        prev = None
        for line in lines:
            size = round(line.size, 1)
            if size in heading_sizes:
                flush()
                level = heading_sizes.index(size) + 1
                if blocks and blocks[-1].kind == "heading" and blocks[-1].level == level and prev is not None \
                        and round(prev.size, 1) == size:
                    blocks[-1].text = squash(blocks[-1].text + " " + line.text)  # a wrapped heading
                else:
                    blocks.append(Block("heading", squash(line.text), page=number, level=level))
            else:
                new_paragraph = prev is None or round(prev.size, 1) != size or prev.y - line.y > 1.4 * spacing \
                    or line.y > prev.y
                # A paragraph that runs on over a page break continues when the next page starts in lower case.
                continues = prev is None and para and line.text.lstrip()[:1].islower()
                if new_paragraph and not continues:
                    flush()
                    para_page = number
                para.append(line.text)
            prev = line
    flush()
    return blocks


def pdf_blocks(path: Path) -> tuple[list[Block], int]:
    """A PDF's blocks and the number of header/footer lines removed."""
    pages = _read_pages(path)
    body = _body_size(pages)
    if body is None:
        return [], 0
    kept_pages, removed = _drop_margins(pages, body)
    heading_sizes = sorted({round(line.size, 1) for p in kept_pages for line in p if line.size >= body * 1.15},
                           reverse=True)
    spacing = _line_spacing(kept_pages, body)
    return _page_blocks(kept_pages, heading_sizes, spacing), removed
