"""From documents to training records: `deltatune prepare`.

documents (read.py) -> chunks (chunking.py) -> candidate pairs (a strategy) -> dedupe -> JSONL.

Strategies:
- `template`: deterministic. A question about each section answered by the section text,
  continuation pairs (first half of a chunk -> second half), and a question per definition-list
  entry ("Term: meaning").
- `model`: a local instruct model writes a question for each chunk and answers it from the
  chunk; an answer whose content words are mostly not in the chunk is dropped as unsupported.

Every record is a `messages` conversation with a `provenance` object beside it (file, page,
heading path, character span in the cleaned document, strategy); `deltatune train` ignores
the extra field. Classification (`--task classification --label-from folder`) writes
`{text, label, provenance}` records, one per chunk, the label being the class folder's name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deltatune.data.dedupe import NEAR_DUPLICATE_THRESHOLD, find_duplicates
from deltatune.docs.chunking import chunk_document
from deltatune.docs.documents import Chunk, Document
from deltatune.docs.read import find_documents, read_document
from deltatune.errors import UserError
from deltatune.files import inject_write_fault, writing

STRATEGIES = ("template", "model")
MIN_SUPPORT = 0.75  # share of an answer's content words that must occur in its chunk
_STOPWORDS = frozenset(
    "the and for are but not you your with this that from have has was were will would can could should "
    "into onto its it's they them their there then than what when where which who why how all any each "
    "about also only just more most some such very may might must does did done been being our out off "
    "one two use used using these those other over under yes".split())


@dataclass
class Summary:
    documents: Counter = field(default_factory=Counter)  # by kind
    skipped_files: int = 0
    empty_documents: list[str] = field(default_factory=list)
    removed_lines: int = 0
    chunks: int = 0
    longest_chunk: int = 0
    candidates: Counter = field(default_factory=Counter)  # by strategy part
    dropped: Counter = field(default_factory=Counter)  # by reason
    kept: int = 0

    def as_dict(self) -> dict:
        return {"documents": sum(self.documents.values()), "documents_by_kind": dict(self.documents),
                "skipped_files": self.skipped_files, "empty_documents": self.empty_documents,
                "header_footer_lines_removed": self.removed_lines, "chunks": self.chunks,
                "longest_chunk_tokens": self.longest_chunk, "candidates": dict(self.candidates),
                "kept": self.kept, "dropped": dict(self.dropped)}

    def lines(self, out: Path, max_tokens: int) -> list[str]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.documents.items()))
        docs = f"documents: {sum(self.documents.values())} read ({kinds})"
        if self.skipped_files:
            docs += f"; {self.skipped_files} other files skipped"
        if self.removed_lines:
            docs += f"; {self.removed_lines} header/footer lines removed"
        out_lines = [docs]
        if self.empty_documents:
            out_lines.append(f"no text in: {', '.join(self.empty_documents)} (a scanned PDF needs OCR first)")
        out_lines.append(f"chunks: {self.chunks} (longest {self.longest_chunk} tokens, budget {max_tokens})")
        made = sum(self.candidates.values())
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.candidates.items()))
        line = f"records: {made} candidates ({parts}) -> {self.kept} kept"
        dropped = sum(self.dropped.values())
        if dropped:
            line += f", {dropped} dropped (" + ", ".join(f"{n} {k}" for k, n in self.dropped.most_common()) + ")"
        out_lines.append(line)
        out_lines.append(f"written: {out}")
        return out_lines


# --- template strategy ------------------------------------------------------------------------

def _topic(doc: Document, chunk: Chunk) -> str:
    path = list(chunk.heading_path)
    if path and path[0] == doc.title:
        path = path[1:]  # the document's own title is said once, in the question's "in <title>"
    return " > ".join(path)


def _halves(text: str) -> tuple[str, str] | None:
    """Split at the paragraph (else sentence) boundary nearest the middle; None if a half is tiny."""
    for pattern in (r"\n\n", r"(?<=[.!?])\s+"):
        cuts = [m for m in re.finditer(pattern, text)]
        if cuts:
            middle = len(text) / 2
            cut = min(cuts, key=lambda m: abs(m.start() - middle))
            first, second = text[:cut.start()].strip(), text[cut.end():].strip()
            if len(first.split()) >= 8 and len(second.split()) >= 8:
                return first, second
    return None


def _pair(question: str, answer: str, chunk: Chunk, strategy: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "provenance": {**chunk.provenance(), "strategy": strategy}}


def template_pairs(doc: Document, chunks: list[Chunk]) -> list[dict]:
    """Deterministic pairs: section questions, definition questions, continuations."""
    pairs = []
    parts = Counter(c.heading_path for c in chunks)
    seen = Counter()
    for chunk in chunks:
        seen[chunk.heading_path] += 1
        if chunk.heading_path:
            topic = _topic(doc, chunk)
            question = f'What does "{doc.title}" say about {topic}?' if topic else f'What is "{doc.title}" about?'
            if parts[chunk.heading_path] > 1:
                question += f" (part {seen[chunk.heading_path]} of {parts[chunk.heading_path]})"
            pairs.append(_pair(question, chunk.text, chunk, "template:section"))
        for term, meaning in chunk.definitions:
            pairs.append(_pair(f'In "{doc.title}", what does "{term}" mean?', meaning, chunk, "template:definition"))
        halves = _halves(chunk.text)
        if halves:
            pairs.append(_pair(f'Continue this passage from "{doc.title}":\n\n{halves[0]}', halves[1], chunk,
                               "template:continuation"))
    return pairs


# --- model strategy ---------------------------------------------------------------------------

def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.casefold()) if len(w) > 2 and w not in _STOPWORDS]


def support(answer: str, chunk_text: str) -> float:
    """Share of the answer's content words that occur in the chunk (0 for an answer with none)."""
    words = content_words(answer)
    if not words:
        return 0.0
    source = set(re.findall(r"\w+", chunk_text.casefold()))
    return sum(w in source for w in words) / len(words)


def question_prompt(chunk: Chunk) -> list[dict]:
    return [{"role": "user", "content": "Read the text and write one question that the text answers. "
                                        f"Reply with the question only.\n\nText:\n{chunk.text}"}]


def answer_prompt(chunk: Chunk, question: str) -> list[dict]:
    return [{"role": "user", "content": "Answer the question using only the text. Be brief.\n\n"
                                        f"Text:\n{chunk.text}\n\nQuestion: {question}"}]


def first_question(generated: str) -> str | None:
    text = " ".join(generated.split())
    end = text.find("?")
    if end < 0:
        return None
    question = text[: end + 1].strip(" \"'*-:")
    return question if len(content_words(question)) >= 1 else None


def model_pairs(chunks: list[Chunk], generate: Callable[[list[list[dict]]], list[str]],
                dropped: Counter) -> list[dict]:
    """A question per chunk from the model, then an answer from the chunk; unsupported answers dropped.

    `generate` maps conversations to the model's replies (evaluate.generate in the CLI; tests pass a stub).
    """
    replies = generate([question_prompt(c) for c in chunks])
    asked = []
    for chunk, reply in zip(chunks, replies):
        question = first_question(reply)
        if question is None:
            dropped["no question generated"] += 1
        else:
            asked.append((chunk, question))
    answers = generate([answer_prompt(c, q) for c, q in asked]) if asked else []
    pairs = []
    for (chunk, question), answer in zip(asked, answers):
        answer = answer.strip()
        if not answer:
            dropped["empty answer"] += 1
        elif support(answer, chunk.text) < MIN_SUPPORT:
            dropped["answer not supported by the chunk"] += 1
        else:
            pairs.append(_pair(question, answer, chunk, "model"))
    return pairs


# --- dedupe and writing -----------------------------------------------------------------------

def dedupe(records: list[dict], key: Callable[[dict], str], dropped: Counter,
           threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[dict]:
    """Drop records whose key text repeats an earlier record's, exactly or nearly."""
    duplicates = find_duplicates([key(r) for r in records], threshold)
    for d in duplicates:
        dropped[f"{d.kind} duplicate"] += 1
    drop = {d.index for d in duplicates}
    return [r for i, r in enumerate(records) if i not in drop]


def _answer(record: dict) -> str:
    return record["messages"][-1]["content"]


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """Under a temporary name, then renamed: never half a file; a full disk is one line."""
    with writing(str(path), path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                inject_write_fault("prepare")
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise UserError(f"{out}: is a folder (give --out a .jsonl file path)")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it, or choose another --out)")
    if out.suffix.lower() not in (".jsonl", ".ndjson"):
        raise UserError(f"{out}: output must be a .jsonl file")


def _label_documents(sources: list[str], summary: Summary) -> list[tuple[Path, str]]:
    """Files under SOURCE/<class>/..., each with its class folder's name."""
    labelled = []
    for source in sources:
        root = Path(source)
        if not root.is_dir():
            raise UserError(f"{root}: --label-from folder needs folders whose subfolders are the classes")
        paths, skipped = find_documents([root])
        summary.skipped_files += len(skipped)
        for path in paths:
            parts = path.relative_to(root).parts
            if len(parts) < 2:
                summary.skipped_files += 1  # a file beside the class folders has no class
                continue
            labelled.append((path, parts[0]))
    labels = {label for _, label in labelled}
    if len(labels) < 2:
        raise UserError(f"{', '.join(sources)}: found {len(labels)} class folder(s) with documents; "
                        "a classification set needs at least two (one subfolder per class)")
    return labelled


def prepare(sources: list[str], out: str | Path, *, tokenizer, max_tokens: int = 256, strategy: str = "template",
            kind: str = "pairs", label_from: str | None = None, generate=None,
            threshold: float = NEAR_DUPLICATE_THRESHOLD) -> Summary:
    """Read, clean, chunk, make records, dedupe, write. Returns the summary; the caller checked `out`.

    `kind`: "pairs" (question/answer conversations, for SFT) or "labelled" ({text, label} records
    from class folders, for classification)."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy '{strategy}': expected one of {', '.join(STRATEGIES)}")
    summary = Summary()
    labelled = kind == "labelled"
    if labelled:
        if label_from != "folder":
            raise UserError("--task classification needs --label-from folder (one subfolder per class)")
        inputs = _label_documents(sources, summary)
    else:
        paths, skipped = find_documents(sources)
        summary.skipped_files = len(skipped)
        inputs = [(p, None) for p in paths]
    if not inputs:
        raise UserError(f"{', '.join(sources)}: no documents found (.pdf, .md, .html, .txt)")

    records: list[dict] = []
    all_chunks: list[Chunk] = []
    for path, label in inputs:
        doc = read_document(path)
        doc.label = label
        summary.documents[doc.kind] += 1
        summary.removed_lines += doc.removed_lines
        if not doc.text.strip():
            summary.empty_documents.append(str(path))
            continue
        chunks = chunk_document(doc, tokenizer, max_tokens)
        summary.chunks += len(chunks)
        summary.longest_chunk = max([summary.longest_chunk] + [c.tokens for c in chunks])
        if labelled:
            records += [{"text": c.text, "label": label, "provenance": c.provenance()} for c in chunks]
        elif strategy == "template":
            records += template_pairs(doc, chunks)
        else:
            all_chunks += chunks
    if strategy == "model" and not labelled:
        records = model_pairs(all_chunks, generate, summary.dropped)
        summary.candidates["model"] = len(all_chunks)
    else:
        for r in records:
            summary.candidates[r.get("provenance", {}).get("strategy", "classification")] += 1
    key = (lambda r: r["text"]) if labelled else _answer
    kept = dedupe(records, key, summary.dropped, threshold)
    summary.kept = len(kept)
    if not kept:
        raise UserError(f"{', '.join(sources)}: no records left to write ("
                        + (", ".join(f"{n} {k}" for k, n in summary.dropped.items()) or "no usable text")
                        + "); nothing was written")
    write_jsonl_atomic(Path(out), kept)
    return summary
