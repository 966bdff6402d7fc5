"""Documents -> cleaned, structured, chunked text -> training pairs, on small documents built here."""

import json
from collections import Counter

import pytest

from deltatune.data.dedupe import find_duplicates, jaccard, shingles
from deltatune.data.formats import load_records
from deltatune.docs.chunking import chunk_document, count_tokens
from deltatune.docs.prepare import model_pairs, prepare, support
from deltatune.docs.read import read_document
from deltatune.errors import UserError

from conftest import run_cli


def make_pdf(pages: list[list[tuple[float, float, str]]]) -> bytes:
    """A valid PDF: each page a list of (font size, baseline y, text) lines in Helvetica at x=72."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    pages_id = len(objects) + 1 + 2 * len(pages)  # content + page objects come first
    kids = []
    for lines in pages:
        ops = []
        for size, y, text in lines:
            escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"BT /F1 {size} Tf 72 {y} Td ({escaped}) Tj ET")
        stream = "\n".join(ops).encode("latin-1")
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                        b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (pages_id, content, font)))
    add(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids)))
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, catalog, xref)
    return bytes(out)


def manual_pdf(path):
    """Three pages, a running header and a numbered footer on each, a word hyphenated at a line end,
    and a paragraph that runs on from page 2 to page 3."""
    pages = []
    for n in (1, 2, 3):
        lines = [(9, 760, "ACME CONFIDENTIAL"), (18, 730, f"Chapter {n}")]
        if n == 1:
            lines += [(11, 700, "The pump needs a careful config-"), (11, 686, "uration before the first start."),
                      (11, 660, "Read every step twice.")]
        if n == 2:
            lines += [(14, 700, "Valves"), (11, 680, "Open the valves slowly. The pressure"),
                      (11, 666, "must stay below two bar while the")]
        if n == 3:
            lines = [(9, 760, "ACME CONFIDENTIAL"), (11, 730, "system fills with water."),
                     (18, 700, "Chapter 3"), (11, 680, "Close the lid.")]
        lines.append((9, 40, f"Acme pump manual - page {n} of 3"))
        pages.append(lines)
    path.write_bytes(make_pdf(pages))
    return path


def test_pdf_cleaning_pages_and_headings(tmp_path):
    doc = read_document(manual_pdf(tmp_path / "pump.pdf"))
    assert doc.kind == "pdf"
    assert doc.removed_lines == 6  # 3 headers + 3 footers; "Chapter N" at the page top is a heading, kept
    assert "ACME" not in doc.text and "page" not in doc.text
    assert [(b.kind, b.text, b.page, b.heading_path) for b in doc.blocks] == [
        ("heading", "Chapter 1", 1, ("Chapter 1",)),
        ("paragraph", "The pump needs a careful configuration before the first start.", 1, ("Chapter 1",)),
        ("paragraph", "Read every step twice.", 1, ("Chapter 1",)),
        ("heading", "Chapter 2", 2, ("Chapter 2",)),
        ("heading", "Valves", 2, ("Chapter 2", "Valves")),
        # Runs on over the page break (the next page starts in lower case): one paragraph, page 2.
        ("paragraph", "Open the valves slowly. The pressure must stay below two bar while the system fills with water.",
         2, ("Chapter 2", "Valves")),
        ("heading", "Chapter 3", 3, ("Chapter 3",)),
        ("paragraph", "Close the lid.", 3, ("Chapter 3",)),
    ]
    for block in doc.blocks:
        assert doc.text[block.start:block.end] == block.text


MARKDOWN = """# Garden guide

Plants need light.

## Watering

### Indoor plants

Water indoor plants once a week. Check the soil first.

### Outdoor plants

Water outdoor plants in the morning.

| Plant | Water |
|---|---|
| Fern | weekly |
| Cactus | monthly |

## Words

- **Mulch**: a layer of material spread over the soil.
- **Compost**: decayed plant matter used as fertiliser.
"""


def test_markdown_nested_headings_tables_and_provenance(tmp_path, tiny_tokenizer):
    path = tmp_path / "garden.md"
    path.write_text(MARKDOWN)
    doc = read_document(path)
    assert doc.title == "Garden guide"
    chunks = chunk_document(doc, tiny_tokenizer, max_tokens=400)
    assert [c.heading_path for c in chunks] == [
        ("Garden guide",), ("Garden guide", "Watering", "Indoor plants"),
        ("Garden guide", "Watering", "Outdoor plants"), ("Garden guide", "Words")]
    assert chunks[2].text == ("Water outdoor plants in the morning.\n\n"
                              "Plant: Fern; Water: weekly\nPlant: Cactus; Water: monthly")
    assert chunks[3].definitions == [("Mulch", "a layer of material spread over the soil."),
                                     ("Compost", "decayed plant matter used as fertiliser.")]
    for chunk in chunks:
        assert doc.text[chunk.start:chunk.end] == chunk.text
        assert chunk.tokens == count_tokens(tiny_tokenizer, chunk.text) <= 400
        assert chunk.provenance() == {"file": str(path), "page": None, "heading_path": list(chunk.heading_path),
                                      "span": [chunk.start, chunk.end]}


def test_chunks_respect_the_token_budget(tmp_path, tiny_tokenizer):
    sentences = [f"Sentence number {i} talks about the quick brown fox." for i in range(30)]
    path = tmp_path / "long.md"
    path.write_text("# Long\n\n" + " ".join(sentences) + "\n\nA short closing paragraph.\n")
    doc = read_document(path)
    chunks = chunk_document(doc, tiny_tokenizer, max_tokens=60)
    assert len(chunks) > 3
    assert all(count_tokens(tiny_tokenizer, c.text) <= 60 for c in chunks)
    # Nothing lost or reordered: the chunks' words are the section's words.
    assert " ".join(c.text for c in chunks).split() == doc.text.split("\n\n", 1)[1].split()
    # Cuts fall between sentences, never inside one.
    assert all(c.text.endswith(".") for c in chunks)


def test_html_table_definitions_and_boilerplate(tmp_path):
    path = tmp_path / "plans.html"
    path.write_text("<html><head><title>Plans &amp; prices</title><script>var x = 1;</script></head><body>"
                    "<nav>Home | About</nav><h1>Plans</h1><p>We sell   two\nplans.</p>"
                    "<table><tr><th>Plan</th><th>Price</th></tr><tr><td>Basic</td><td>5 EUR</td></tr>"
                    "<tr><td>Pro</td><td>12 EUR</td></tr></table>"
                    "<dl><dt>Seat</dt><dd>One user account on a plan.</dd></dl></body></html>")
    doc = read_document(path)
    assert doc.title == "Plans & prices"
    assert doc.text == ("Plans\n\nWe sell two plans.\n\nPlan: Basic; Price: 5 EUR\nPlan: Pro; Price: 12 EUR\n\n"
                        "Seat: One user account on a plan.")
    assert doc.blocks[-1].definitions == [("Seat", "One user account on a plan.")]


def test_text_with_form_feed_pages_and_hyphenation(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Notes v1\nFirst para-\ngraph here.\n\nSecond.\n- 1 -\f"
                    "Notes v1\nThird paragraph.\n- 2 -\n")
    doc = read_document(path)
    assert [(b.text, b.page) for b in doc.blocks] == [("First paragraph here.", 1), ("Second.", 1),
                                                      ("Third paragraph.", 2)]
    assert doc.removed_lines == 4


def test_exact_and_near_duplicates():
    base = ("the kettle switches off by itself when the water boils and the light ring turns white again; "
            "keep-warm mode holds the chosen temperature for thirty minutes and lifting the kettle from its "
            "base cancels it, so put it back before you press the button")
    texts = [base, "  " + base.upper().replace(" ", "\n "),  # case and whitespace differ only
             base.replace("white", "blue"), "something else entirely about descaling with citric acid"]
    found = find_duplicates(texts)
    assert [(d.index, d.of, d.kind) for d in found] == [(1, 0, "exact"), (2, 0, "near")]
    assert found[1].similarity == round(jaccard(shingles(texts[0]), shingles(texts[2])), 4)
    assert 0.8 <= found[1].similarity < 1.0
    assert find_duplicates(texts, threshold=0.95) == found[:1]


def test_model_strategy_drops_unsupported_answers(tmp_path, tiny_tokenizer):
    path = tmp_path / "m.md"
    path.write_text("# A\n\nThe pump runs at two bar.\n\n# B\n\nThe valve is red.\n\n# C\n\nNo question here.\n")
    chunks = chunk_document(read_document(path), tiny_tokenizer, max_tokens=100)

    def fake_generate(conversations):
        prompt = conversations[0][-1]["content"]
        if prompt.startswith("Read the text"):
            return ["What pressure does the pump run at? And more", "What colour is the valve?", "Nothing"]
        return ["The pump runs at two bar.", "The valve is painted green by elves."]

    dropped = Counter()
    pairs = model_pairs(chunks, fake_generate, dropped)
    assert dropped == {"no question generated": 1, "answer not supported by the chunk": 1}
    assert pairs == [{"messages": [{"role": "user", "content": "What pressure does the pump run at?"},
                                   {"role": "assistant", "content": "The pump runs at two bar."}],
                      "provenance": {**chunks[0].provenance(), "strategy": "model"}}]
    assert support("The valve is painted green by elves.", chunks[1].text) < 0.75


def test_model_strategy_with_a_real_generator(tmp_path, tiny_model_dir):
    """The tiny random model writes nonsense: every candidate must be dropped, with reasons, and nothing written."""
    from deltatune.evaluate.generate import generate
    from deltatune.model.load import load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_model_dir))
    path = tmp_path / "m.md"
    path.write_text("# A\n\nThe pump runs at two bar.\n\n# B\n\nThe valve is red.\n")
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(UserError, match="no records left") as err:
        prepare([str(path)], out, tokenizer=tokenizer, strategy="model",
                generate=lambda convs: generate(model, tokenizer, convs, max_new_tokens=8))
    assert "no question generated" in str(err.value) or "not supported" in str(err.value)
    assert not out.exists()


def test_prepare_cli_documents_to_training(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "garden.md").write_text(MARKDOWN)
    (docs / "z-garden-copy.md").write_text(MARKDOWN)  # the same manual again, read later: all duplicates
    manual_pdf(docs / "pump.pdf")
    (docs / "image.png").write_bytes(b"\x89PNG")
    out = tmp_path / "pairs.jsonl"
    proc = run_cli("prepare", str(docs), "--out", str(out), "--model", str(tiny_model_dir), "--max-tokens", "400")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    copies = [r for r in records if r["provenance"]["file"].endswith("z-garden-copy.md")]
    assert copies == []
    garden = [r for r in records if r["provenance"]["file"].endswith("/garden.md")]
    pump = [r for r in records if r["provenance"]["file"].endswith("pump.pdf")]
    assert len(garden) + len(pump) == len(records)
    assert "documents: 3 read (2 markdown, 1 pdf); 1 other files skipped; 6 header/footer lines removed" in proc.stdout
    # The copy repeats all 7 of garden.md's candidates; within garden.md the continuation "- Compost: decayed
    # plant matter used as fertiliser." nearly repeats the definition's answer (Jaccard 0.8), so 1 near.
    assert len(garden) == 6
    assert f"-> {len(records)} kept, 8 dropped (7 exact duplicate, 1 near duplicate)" in proc.stdout
    # Template pairs: a section question answered by the section, definitions, provenance.
    indoor = ["Garden guide", "Watering", "Indoor plants"]
    section = next(r for r in garden if r["provenance"]["heading_path"] == indoor)
    assert section["messages"][0]["content"] == 'What does "Garden guide" say about Watering > Indoor plants?'
    assert section["messages"][1]["content"] == "Water indoor plants once a week. Check the soil first."
    assert {"Mulch", "Compost"} <= {r["messages"][0]["content"].split('"')[3] for r in garden
                                    if r["provenance"]["strategy"] == "template:definition"}
    valves = next(r for r in pump if r["provenance"]["heading_path"] == ["Chapter 2", "Valves"])
    assert valves["provenance"]["page"] == 2
    # Training reads the file as it is (provenance beside messages is ignored).
    loaded, fmt = load_records(out)
    assert fmt == "messages" and len(loaded) == len(records)

    # An existing output is never replaced without --overwrite.
    before = out.read_bytes()
    proc = run_cli("prepare", str(docs), "--out", str(out), "--model", str(tiny_model_dir))
    assert proc.returncode == 2 and "already exists" in proc.stderr and out.read_bytes() == before

    proc = run_cli("lint", str(out), "--model", str(tiny_model_dir), "--max-seq-length", "512", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["records"] == len(records) and report["errors"] == [] and report["duplicates"]["exact"] == 0

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntrain_file: pairs.jsonl\noutput_dir: run\nmax_steps: 2\n"
                      "per_device_train_batch_size: 4\nmax_seq_length: 256\nmetric: none\nbf16: false\n")
    proc = run_cli("train", str(config))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_classification_from_class_folders(tmp_path, tiny_tokenizer):
    root = tmp_path / "tickets"
    for label, texts in {"billing": ["I was charged twice this month.", "Refund my last invoice please."],
                         "shipping": ["My parcel has not arrived yet.", "The box came damaged."]}.items():
        (root / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / label / f"{i}.txt").write_text(text + "\n")
    (root / "billing" / "dup.txt").write_text("I was charged twice this month.\n")
    (root / "README.txt").write_text("not in a class folder\n")
    out = tmp_path / "cls.jsonl"
    summary = prepare([str(root)], out, tokenizer=tiny_tokenizer, kind="labelled", label_from="folder")
    assert summary.kept == 4 and summary.dropped == {"exact duplicate": 1} and summary.skipped_files == 1
    records, fmt = load_records(out)
    assert fmt == "classification"
    assert sorted((r.label, r.text) for r in records) == [
        ("billing", "I was charged twice this month."), ("billing", "Refund my last invoice please."),
        ("shipping", "My parcel has not arrived yet."), ("shipping", "The box came damaged.")]
    with pytest.raises(UserError, match="--label-from folder"):
        prepare([str(root)], tmp_path / "x.jsonl", tokenizer=tiny_tokenizer, kind="labelled")


def test_near_duplicates_match_the_exhaustive_search_on_a_narrow_vocabulary():
    """Texts of 12 words crowd the LSH groups with weak candidates; the search must still find exactly what
    comparing every pair finds (a text repeats an earlier one exactly, or nearly one that is not itself a repeat)."""
    import random

    rng = random.Random(7)
    vocab = "red blue sun sea fox owl tea sky map oak ink jar".split()
    texts = []
    for i in range(600):
        if i > 20 and rng.random() < 0.2:  # a near copy of an earlier text: one word changed, or one added
            words = rng.choice(texts).split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            texts.append(" ".join(words + ([rng.choice(vocab)] if rng.random() < 0.5 else [])))
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(25, 40))))
    sets = [shingles(t) for t in texts]
    want, originals = {}, []
    for i, t in enumerate(texts):
        same = next((j for j in range(i) if " ".join(texts[j].split()) == " ".join(t.split())), None)
        near = [j for j in originals if jaccard(sets[i], sets[j]) >= 0.8]
        if same is not None or near:
            want[i] = "exact" if same is not None else "near"
        else:
            originals.append(i)
    found = find_duplicates(texts)
    assert len(want) > 50
    assert {d.index: d.kind for d in found} == want
    near = [d for d in found if d.kind == "near"]
    assert near and all(jaccard(sets[d.index], sets[d.of]) >= 0.8 and d.of not in want for d in near)
