"""Read documents (PDF, Markdown, HTML, plain text), clean them and cut them into chunks.

Every reader produces the same thing: a list of `Block`s (headings, paragraphs, lists, tables,
code) that know their page and heading path. The cleaned document text is the blocks joined
by blank lines, and every block and chunk records its [start, end) character span in that
text, so `document.text[start:end] == chunk.text` always holds and a user can find any
training pair's origin.

Chunks follow the structure: they never cross a heading, they pack whole blocks while the
target model's tokenizer counts no more than `max_tokens`, and only a block too long on its own
is split (by lines, then sentences, then token windows).
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from deltatune.errors import UserError

SUFFIXES = {".pdf": "pdf", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
            ".txt": "text", ".text": "text"}


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
        lines = [l for l in lines if l is None or l.strip()]
        edge = lines[:margin] + lines[-margin:] if len(lines) > margin else lines
        seen.update({_digits_to_hash(l) for l in edge if l is not None})
    need = max(2, math.ceil(0.8 * len(pages)))  # "every page", forgiving a title page or two
    return {line for line, count in seen.items() if count >= need}


def margin_drops(lines: list[str | None], repeated: set[str], margin: int = 2) -> set[int]:
    """Indices of repeated header/footer lines, looking only at the page's first and last lines."""
    content = [i for i, line in enumerate(lines) if line is None or line.strip()]
    edge = set(content[:margin] + content[-margin:])
    return {i for i in edge if lines[i] is not None and _digits_to_hash(lines[i]) in repeated}


_PAGE_NUMBER = re.compile(r"^\s*(page\s*)?\d+(\s*(/|of)\s*\d+)?\s*$", re.IGNORECASE)


# --- PDF --------------------------------------------------------------------------------------

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
    return [l for l in lines if l.text.strip()]


def _pdf_blocks(path: Path) -> tuple[list[Block], int]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        pages = [_pdf_page_lines(p) for p in reader.pages]
    except (PdfReadError, OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: cannot read this PDF ({type(err).__name__}: {err})") from None
    sizes: Counter[float] = Counter()
    for lines in pages:
        for l in lines:
            sizes[round(l.size, 1)] += len(l.text)
    if not sizes:
        return [], 0
    body = sizes.most_common(1)[0][0]

    # Text set larger than the body is a heading, never a running header ("Chapter 2" at the top of a page).
    def margin_text(lines):
        return [l.text if l.size < body * 1.15 else None for l in lines]

    repeated = repeated_margin_lines([margin_text(p) for p in pages])
    removed = 0
    kept_pages = []
    for lines in pages:
        drop = margin_drops(margin_text(lines), repeated)
        removed += len(drop)
        kept = [l for i, l in enumerate(lines) if i not in drop]
        # A bare page number at the page's edge is a footer even when it is not repeated text.
        while kept and _PAGE_NUMBER.match(kept[-1].text):
            kept.pop()
            removed += 1
        kept_pages.append(kept)

    heading_sizes = sorted({round(l.size, 1) for p in kept_pages for l in p if l.size >= body * 1.15}, reverse=True)
    gaps = sorted(a.y - b.y for p in kept_pages for a, b in zip(p, p[1:])
                  if 0 < a.y - b.y and abs(a.size - body) < 0.5 and abs(b.size - body) < 0.5)
    # Most gaps are line spacing, paragraph gaps are the minority: the lower quartile is the line spacing.
    spacing = gaps[len(gaps) // 4] if gaps else body * 1.2

    blocks: list[Block] = []
    para: list[str] = []
    para_page = None

    def flush():
        nonlocal para
        if para:
            blocks.append(Block("paragraph", join_lines(para), page=para_page))
        para = []

    for number, lines in enumerate(kept_pages, start=1):
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
    return blocks, removed


# --- Markdown ---------------------------------------------------------------------------------

_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_LIST = re.compile(r"^\s*([-*+]|\d+[.)])\s+")
_MD_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
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


def _split_table_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [strip_inline_markdown(c.strip()) for c in line.split("|")]


def _markdown_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":  # YAML front matter is metadata, not content
        end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
        if end is not None:
            lines = lines[end + 1:]
    text = re.sub(r"<!--.*?-->", "", "\n".join(lines), flags=re.DOTALL)
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if line.lstrip().startswith(("```", "~~~")):
            fence = line.lstrip()[:3]
            body = []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith(fence):
                body.append(lines[i])
                i += 1
            i += 1
            if any(b.strip() for b in body):
                blocks.append(Block("code", "\n".join(body).strip("\n")))
            continue
        heading = _MD_HEADING.match(line)
        if heading:
            blocks.append(Block("heading", strip_inline_markdown(heading.group(2)), level=len(heading.group(1))))
            i += 1
            continue
        if i + 1 < len(lines) and re.match(r"^\s*(=+|-+)\s*$", lines[i + 1]) and not _MD_LIST.match(line) \
                and "|" not in line:
            level = 1 if lines[i + 1].strip().startswith("=") else 2  # setext heading
            blocks.append(Block("heading", strip_inline_markdown(line.strip()), level=level))
            i += 2
            continue
        if "|" in line and i + 1 < len(lines) and _MD_TABLE_RULE.match(lines[i + 1]):
            header = _split_table_row(line)
            rows = []
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                rows.append(_split_table_row(lines[i]))
                i += 1
            blocks.append(Block("table", flatten_table(rows, header)))
            continue
        if _MD_LIST.match(line):
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
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not _MD_HEADING.match(lines[i]) \
                and not lines[i].lstrip().startswith(("```", "~~~")) and not (para and _MD_LIST.match(lines[i])):
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
    return blocks


# --- HTML -------------------------------------------------------------------------------------

_HTML_SKIP = {"script", "style", "noscript", "template", "nav", "svg", "button", "form"}
_HTML_BLOCK = {"p", "div", "section", "article", "main", "blockquote", "header", "footer", "aside", "figure",
               "figcaption", "body", "br", "hr", "ul", "ol", "dl", "address"}


class _HtmlReader(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.title = ""
        self.buf: list[str] = []
        self.skip = 0
        self.in_title = False
        self.in_head = False
        self.heading_level = 0
        self.pre = 0
        self.list_items: list[str] | None = None
        self.definitions: list[tuple[str, str]] = []
        self.term = ""
        self.table: list[list[str]] | None = None
        self.table_header: list[str] | None = None
        self.row: list[str] | None = None
        self.row_is_header = False
        self.cell: list[str] | None = None
        self.caption: list[str] | None = None

    def _text(self) -> str:
        text = "".join(self.buf)
        self.buf = []
        return text

    def flush(self):
        text = self._text()
        if self.pre:
            return
        text = squash(text)
        if text:
            self.blocks.append(Block("paragraph", text))

    def handle_starttag(self, tag, attrs):
        if tag in _HTML_SKIP:
            self.skip += 1
            return
        if self.skip:
            return
        if tag == "title":
            self.in_title = True
        elif tag == "head":
            self.in_head = True
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.flush()
            self.heading_level = int(tag[1])
        elif tag == "pre":
            self.flush()
            self.pre += 1
        elif tag == "table":
            self.flush()
            if self.table is None:
                self.table, self.table_header = [], None
        elif tag == "caption" and self.table is not None:
            self.caption = []
        elif tag == "tr" and self.table is not None:
            self.row, self.row_is_header = [], True
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []
            self.row_is_header = self.row_is_header and tag == "th"
        elif tag == "li":
            if self.list_items is None:
                self.flush()
                self.list_items = []
            else:
                self._end_item()
        elif tag in ("dt", "dd"):
            self._end_definition_part()
        elif tag in _HTML_BLOCK and self.table is None and self.list_items is None:
            self.flush()

    def _end_item(self):
        item = squash(self._text())
        if item and self.list_items is not None:
            self.list_items.append(item)

    def _end_definition_part(self):
        text = squash(self._text())
        if not text:
            return
        if not self.term:
            self.term = text
        else:
            self.definitions.append((self.term, text))
            self.term = ""

    def handle_endtag(self, tag):
        if tag in _HTML_SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag == "title":
            self.title = squash(self._text())
            self.in_title = False
        elif tag == "head":
            self.in_head = False
            self.buf = []
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6") and self.heading_level:
            text = squash(self._text())
            if text:
                self.blocks.append(Block("heading", text, level=self.heading_level))
            self.heading_level = 0
        elif tag == "pre" and self.pre:
            self.pre -= 1
            text = self._text().strip("\n")
            if text.strip():
                self.blocks.append(Block("code", text))
        elif tag in ("td", "th") and self.cell is not None:
            self.row.append(squash("".join(self.cell)))
            self.cell = None
        elif tag == "caption" and self.caption is not None:
            self.caption_text = squash("".join(self.caption))
            self.caption = None
        elif tag == "tr" and self.row is not None:
            if self.row_is_header and self.table_header is None and not self.table:
                self.table_header = self.row
            elif self.row:
                self.table.append(self.row)
            self.row = None
        elif tag == "table" and self.table is not None:
            caption = getattr(self, "caption_text", "")
            text = flatten_table(self.table, self.table_header)
            if caption:
                text = f"{caption}\n{text}"
            if text.strip():
                self.blocks.append(Block("table", text))
            self.table, self.caption_text = None, ""
            self.buf = []
        elif tag in ("ul", "ol") and self.list_items is not None:
            self._end_item()
            definitions = [d for d in (definition_of(it) for it in self.list_items) if d]
            if self.list_items:
                self.blocks.append(Block("list", "\n".join("- " + it for it in self.list_items),
                                         definitions=definitions))
            self.list_items = None
        elif tag == "dl":
            self._end_definition_part()
            if self.definitions:
                self.blocks.append(Block("list", "\n".join(f"{t}: {d}" for t, d in self.definitions),
                                         definitions=list(self.definitions)))
            self.definitions, self.term = [], ""
        elif tag in _HTML_BLOCK and self.table is None and self.list_items is None:
            self.flush()

    def handle_data(self, data):
        if self.skip or (self.in_head and not self.in_title):
            return
        if self.in_title:
            self.buf.append(data)
        elif self.cell is not None:
            self.cell.append(data)
        elif self.caption is not None:
            self.caption.append(data)
        elif self.table is not None:
            return  # whitespace between table tags
        else:
            self.buf.append(data)


def _html_blocks(text: str) -> tuple[list[Block], str]:
    reader = _HtmlReader()
    reader.feed(text)
    reader.close()
    reader.flush()
    return reader.blocks, reader.title


# --- plain text -------------------------------------------------------------------------------

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


# --- documents --------------------------------------------------------------------------------

def _assemble(doc: Document) -> Document:
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
        blocks, removed = _pdf_blocks(path)
    elif kind == "markdown":
        blocks = _markdown_blocks(_read_utf8(path))
    elif kind == "html":
        blocks, title = _html_blocks(_read_utf8(path))
    else:
        blocks, removed = _text_blocks(_read_utf8(path))
    blocks = [b for b in blocks if b.text.strip()]
    return _assemble(Document(path, kind, html.unescape(title), blocks, removed_lines=removed))


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


# --- chunking ---------------------------------------------------------------------------------

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
