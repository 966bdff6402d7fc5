"""Read a document file (PDF, Markdown, HTML, plain text) into a cleaned `Document`; find documents in folders."""

from __future__ import annotations

import html
from pathlib import Path

from deltatune.docs.documents import Block, Document, assemble, join_lines, margin_drops, repeated_margin_lines
from deltatune.docs.html import html_blocks
from deltatune.docs.markdown import markdown_blocks
from deltatune.docs.pdf import pdf_blocks
from deltatune.errors import UserError

SUFFIXES = {".pdf": "pdf", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
            ".txt": "text", ".text": "text"}


def _text_blocks(text: str) -> tuple[list[Block], int]:
    """Paragraphs split at blank lines; form feeds (pdftotext output) are page breaks."""
    pages = [p.splitlines() for p in text.split("\f")]
    repeated = repeated_margin_lines(pages)
    blocks, removed = [], 0
    for number, lines in enumerate(pages, start=1):
        drop = margin_drops(lines, repeated)
        removed += len(drop)
        lines = [line for i, line in enumerate(lines) if i not in drop]
        para: list[str] = []
        for line in lines + [""]:
            if line.strip():
                para.append(line)
            elif para:
                blocks.append(Block("paragraph", join_lines(para), page=number if len(pages) > 1 else None))
                para = []
    return blocks, removed


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (re-save the file as UTF-8)") from None


def read_document(path: str | Path) -> Document:
    """Read one file into a cleaned, structured Document."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unsupported document type '{path.suffix}' "
                        f"(use {', '.join(sorted(SUFFIXES))}, or a folder of them)")
    title, removed = "", 0
    if kind == "pdf":
        blocks, removed = pdf_blocks(path)
    elif kind == "markdown":
        blocks = markdown_blocks(_read_utf8(path))
    elif kind == "html":
        blocks, title = html_blocks(_read_utf8(path))
    else:
        blocks, removed = _text_blocks(_read_utf8(path))
    blocks = [b for b in blocks if b.text.strip()]
    return assemble(Document(path, kind, html.unescape(title), blocks, removed_lines=removed))


def find_documents(sources: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """Expand files and folders (recursively, sorted) into (documents, skipped files)."""
    found, skipped = [], []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            for path in sorted(p for p in source.rglob("*") if p.is_file()):
                if any(part.startswith(".") for part in path.relative_to(source).parts):
                    continue  # hidden files and folders (.git, .DS_Store)
                (found if path.suffix.lower() in SUFFIXES else skipped).append(path)
        elif source.is_file():
            if source.suffix.lower() not in SUFFIXES:
                raise UserError(f"{source}: unsupported document type '{source.suffix}' "
                                f"(use {', '.join(sorted(SUFFIXES))}, or a folder of them)")
            found.append(source)
        else:
            raise UserError(f"{source}: no such file or folder")
    return found, skipped
