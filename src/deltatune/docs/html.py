"""HTML -> blocks (stdlib HTMLParser): headings, paragraphs, pre, tables with captions, lists, definition lists.

Scripts, styles, navigation and forms are skipped; the <title> becomes the document's title.
"""

from __future__ import annotations

from html.parser import HTMLParser

from deltatune.docs.documents import Block, definition_of, flatten_table, squash

_HTML_SKIP = {"script", "style", "noscript", "template", "nav", "svg", "button", "form"}
_HTML_BLOCK = {"p", "div", "section", "article", "main", "blockquote", "header", "footer", "aside", "figure",
               "figcaption", "body", "br", "hr", "ul", "ol", "dl", "address"}
_HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")


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
        self.caption_text = ""

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

    def _block_boundary(self):
        """A block-level tag ends the running paragraph, except inside a table or a list."""
        if self.table is None and self.list_items is None:
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

    # --- start tags ---

    def _start_title(self, tag):
        self.in_title = True

    def _start_head(self, tag):
        self.in_head = True

    def _start_heading(self, tag):
        self.flush()
        self.heading_level = int(tag[1])

    def _start_pre(self, tag):
        self.flush()
        self.pre += 1

    def _start_table(self, tag):
        self.flush()
        if self.table is None:
            self.table, self.table_header = [], None

    def _start_caption(self, tag):
        if self.table is not None:
            self.caption = []

    def _start_row(self, tag):
        if self.table is not None:
            self.row, self.row_is_header = [], True

    def _start_cell(self, tag):
        if self.row is not None:
            self.cell = []
            self.row_is_header = self.row_is_header and tag == "th"

    def _start_item(self, tag):
        if self.list_items is None:
            self.flush()
            self.list_items = []
        else:
            self._end_item()

    def _start_definition_part(self, tag):
        self._end_definition_part()

    # --- end tags ---

    def _end_title(self, tag):
        self.title = squash(self._text())
        self.in_title = False

    def _end_head(self, tag):
        self.in_head = False
        self.buf = []

    def _end_heading(self, tag):
        if not self.heading_level:
            return
        text = squash(self._text())
        if text:
            self.blocks.append(Block("heading", text, level=self.heading_level))
        self.heading_level = 0

    def _end_pre(self, tag):
        if not self.pre:
            return
        self.pre -= 1
        text = self._text().strip("\n")
        if text.strip():
            self.blocks.append(Block("code", text))

    def _end_cell(self, tag):
        if self.cell is not None:
            self.row.append(squash("".join(self.cell)))
            self.cell = None

    def _end_caption(self, tag):
        if self.caption is not None:
            self.caption_text = squash("".join(self.caption))
            self.caption = None

    def _end_row(self, tag):
        if self.row is None:
            return
        if self.row_is_header and self.table_header is None and not self.table:
            self.table_header = self.row
        elif self.row:
            self.table.append(self.row)
        self.row = None

    def _end_table(self, tag):
        if self.table is None:
            return
        text = flatten_table(self.table, self.table_header)
        if self.caption_text:
            text = f"{self.caption_text}\n{text}"
        if text.strip():
            self.blocks.append(Block("table", text))
        self.table, self.caption_text = None, ""
        self.buf = []

    def _end_list(self, tag):
        if self.list_items is None:
            self._block_boundary()  # ul and ol are block tags too
            return
        self._end_item()
        definitions = [d for d in (definition_of(it) for it in self.list_items) if d]
        if self.list_items:
            self.blocks.append(Block("list", "\n".join("- " + it for it in self.list_items),
                                     definitions=definitions))
        self.list_items = None

    def _end_definition_list(self, tag):
        self._end_definition_part()
        if self.definitions:
            self.blocks.append(Block("list", "\n".join(f"{t}: {d}" for t, d in self.definitions),
                                     definitions=list(self.definitions)))
        self.definitions, self.term = [], ""

    # Tag -> handler(self, tag). A block tag without a handler of its own ends the running paragraph.
    _START = {"title": _start_title, "head": _start_head, **dict.fromkeys(_HEADINGS, _start_heading),
              "pre": _start_pre, "table": _start_table, "caption": _start_caption, "tr": _start_row,
              "td": _start_cell, "th": _start_cell, "li": _start_item,
              "dt": _start_definition_part, "dd": _start_definition_part}
    _END = {"title": _end_title, "head": _end_head, **dict.fromkeys(_HEADINGS, _end_heading), "pre": _end_pre,
            "td": _end_cell, "th": _end_cell, "caption": _end_caption, "tr": _end_row, "table": _end_table,
            "ul": _end_list, "ol": _end_list, "dl": _end_definition_list}

    def handle_starttag(self, tag, attrs):
        if tag in _HTML_SKIP:
            self.skip += 1
            return
        if self.skip:
            return
        handler = self._START.get(tag)
        if handler is not None:
            handler(self, tag)
        elif tag in _HTML_BLOCK:
            self._block_boundary()

    def handle_endtag(self, tag):
        if tag in _HTML_SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        handler = self._END.get(tag)
        if handler is not None:
            handler(self, tag)
        elif tag in _HTML_BLOCK:
            self._block_boundary()

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


def html_blocks(text: str) -> tuple[list[Block], str]:
    """An HTML page's blocks and its <title> text."""
    reader = _HtmlReader()
    reader.feed(text)
    reader.close()
    reader.flush()
    return reader.blocks, reader.title
