"""`deltatune lint`: what training would make of a data file, before training on it.

Records are validated by the same code as training (`formats.load_records`, collecting every
bad record instead of stopping at the first) and tokenised by the same masking code
(`data.examples.tokenize_conversation`), so the figures are the ones a run would see: token lengths of
prompts (untrained tokens) and responses (trained tokens), truncation at `max_seq_length`,
examples left with no trained token, duplicates, train/validation overlap, short responses,
labels, and one example rendered with its trained tokens marked.

Errors (exit 1) are what makes training refuse the data; everything else is a figure or a warning.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from deltatune.data.dedupe import NEAR_DUPLICATE_THRESHOLD, find_duplicates, overlaps
from deltatune.data.examples import (
    IGNORE_INDEX,
    held_out_count,
    tokenize_conversation,
    tokenize_pair,
    trailing_text,
    trained_renderings,
    truncate_pair,
)
from deltatune.data.formats import CHAT_FORMATS, Record, detect_format, parse_records, read_raw
from deltatune.data.sources import is_dataset_source, mix_draws, seeded_sample, training_sources
from deltatune.errors import UserError

SHORT_RESPONSE_WORDS = 3  # responses with fewer words are listed (fine for labels, suspicious for prose)
MARK_OPEN, MARK_CLOSE = "[[", "]]"  # trained text in plain output
SHOWN = 5  # at most this many sources listed per finding
SAMPLE = 20_000  # records whose tokens lint counts in a bigger file: enough for the percentiles, fast at any size


def percentiles(values: list[int]) -> dict:
    """min, p50, p90, p99, max by the nearest-rank method (always a value that occurs)."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p):
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"min": ordered[0], "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 2)}


def record_text(record: Record) -> str:
    """One string per record for duplicate checks: every turn with its role, or text and label."""
    if record.messages:
        sides = [("chosen", record.chosen), ("rejected", record.rejected)] if record.chosen else []
        calls = [f"calls: {json.dumps(m['tool_calls'])}" for m in record.messages if m.get("tool_calls")]
        return "\n".join([f"{m['role']}: {m['content']}" for m in record.messages] + calls
                         + [f"{name}: {m['content']}" for name, turns in sides for m in turns])
    return f"{record.text}\n{record.text_pair or ''}\n{record.label or ''}"


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def _counted(sources: list[str], total: int) -> dict:
    """A finding: how many records (and which, the first few), and their share of `total`."""
    return {"count": len(sources), "share": _share(len(sources), total), "records": sources[:SHOWN]}


def _read(path: str, fmt: str, errors: list[str], columns: dict[str, str] | None, split: str | None = None
          ) -> tuple[list[Record], str, Counter]:
    if not is_dataset_source(path) and not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    formats: Counter = Counter()

    def counted():  # one pass: a big file or dataset is costly to read, and errors stay in line order
        for line, obj in read_raw(path, errors, columns=columns, split=split):
            formats[detect_format(obj) or "unknown"] += 1
            yield line, obj
    records, fmt = parse_records(counted(), path, fmt, errors)
    return records, fmt, formats


def rendered_examples(tokenizer, record: Record, max_seq_length: int, train_on_inputs: bool = False,
                      first: int = 0, trailer: str = "") -> list[dict]:
    """The record as the model sees it, trained characters wrapped in [[ ]] and the truncation point marked:
    one rendering, or one per assistant turn where the template rewrites the history (`first`: assistant
    turns before it are not trained, as in a preference pair's prompt)."""
    renderings = trained_renderings(tokenizer, record.messages, record.source, first, trailer, record.tools)
    examples = tokenize_conversation(tokenizer, record.messages, train_on_inputs=train_on_inputs,
                                     source=record.source, first=first, trailer=trailer, tools=record.tools)
    return [marked(tokenizer, text, ex, record.source, max_seq_length) for (text, _), ex in zip(renderings, examples)]


def marked(tokenizer, text: str, example, source: str, max_seq_length: int) -> dict:
    """One example's text with its trained characters in [[ ]] and its truncation point."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    trained: list[list[int]] = []
    for t, (start, end) in enumerate(offsets[:max_seq_length]):
        if example.labels[t] != IGNORE_INDEX and end > start:
            if trained and trained[-1][1] >= start:
                trained[-1][1] = max(trained[-1][1], end)
            else:
                trained.append([start, end])
    cut = offsets[max_seq_length][0] if len(offsets) > max_seq_length else None
    pieces, pos = [], 0
    for start, end in trained:
        pieces += [text[pos:start], MARK_OPEN, text[start:end], MARK_CLOSE]
        pos = end
    pieces.append(text[pos:cut] if cut is not None else text[pos:])
    plain = "".join(pieces) + (f"\n✂ truncated here at max_seq_length={max_seq_length}" if cut is not None else "")
    return {"source": source, "text": text, "trained_spans": trained, "truncated_at": cut, "plain": plain}


def lint(data: str, tokenizer, *, max_seq_length: int = 1024, validation: str | None = None, fmt: str = "auto",
         train_on_inputs: bool = False, threshold: float = NEAR_DUPLICATE_THRESHOLD, sample: int | None = SAMPLE,
         columns: dict[str, str] | None = None, split: str | None = None) -> dict:
    """Every record is read and checked, and duplicates are found among all of them; the checks that tokenise
    (lengths, truncation, masks) run on a seeded sample of `sample` records of a bigger file (None: all)."""
    errors: list[str] = []
    warnings: list[str] = []
    records, fmt, formats = _read(data, fmt, errors, columns, split)
    report: dict = {"data": str(data), "format": fmt, "records": len(records), "formats": dict(formats),
                    "max_seq_length": max_seq_length}
    roles = Counter(m["role"] for r in records for m in r.messages)
    report["roles"] = dict(roles)
    tokenised = seeded_sample(records, sample, seed=0)
    if len(tokenised) < len(records):
        report["sampled"] = {"tokenised": len(tokenised), "of": len(records)}
    if fmt in CHAT_FORMATS:
        _lint_chats(data, tokenised, tokenizer, max_seq_length, train_on_inputs, report, errors, warnings)
    elif records and records[0].chosen is not None:
        _lint_pairs(data, tokenised, tokenizer, max_seq_length, report, errors, warnings)
    else:
        _lint_texts(tokenised, fmt, tokenizer, max_seq_length, report, warnings)
    texts = [record_text(r) for r in records]
    _lint_duplicates(records, texts, threshold, report, warnings)
    if validation:
        _lint_validation(validation, fmt, records, texts, threshold, report, errors, warnings, columns)
    if not records and not errors:
        errors.append(f"{data}: no records found (add at least one)")
    report["errors"] = errors
    report["warnings"] = warnings
    return report


def lint_run_data(data, tokenizer, sample: int | None = SAMPLE) -> tuple[list[dict], list[dict]]:
    """(a report per training source of a run config's DataArgs, each read with its own format, columns and split,
    and the mix's rows when there are several)."""
    sources = training_sources(data)
    reports = [lint(s.path, tokenizer, max_seq_length=data.max_seq_length, validation=data.validation_file,
                    fmt=s.format, train_on_inputs=data.train_on_inputs, sample=sample, columns=s.columns, split=s.split)
               for s in sources]
    held_out = 0.0 if data.validation_file else data.validation_split
    mix = mix_report(reports, [s.weight for s in sources], held_out) if len(sources) > 1 else []
    return reports, mix


def mix_report(reports: list[dict], weights: list[float], validation_split: float) -> list[dict]:
    """A training mix, source by source: its valid records, those left after its validation share, the draws
    its weight gives it, and its share of the training tokens (draws x the mean tokens of its examples)."""
    available = [r["records"] - held_out_count(r["records"], validation_split) for r in reports]
    draws = mix_draws(available, weights)
    tokens = [n * r.get("tokens", {}).get("total", {}).get("mean", 0) for r, n in zip(reports, draws)]
    return [{"source": r["data"], "records": r["records"], "available": a, "weight": w, "drawn": n,
             "token_share": _share(t, sum(tokens))}
            for r, a, w, n, t in zip(reports, available, weights, draws, tokens)]


def print_mix(rows: list[dict], console=None) -> None:
    from rich.console import Console

    console = console or Console(highlight=False)
    for row in rows:
        console.print(f"mix: {row['source']}: {row['drawn']} of the training draws from {row['available']} of its "
                      f"{row['records']} records (weight {row['weight']:g}), about {100 * row['token_share']:.1f} % "
                      "of the training tokens", markup=False, soft_wrap=True)


def _lint_chats(data, records: list[Record], tokenizer, max_seq_length: int, train_on_inputs: bool, report: dict,
                errors: list[str], warnings: list[str]) -> None:
    """Conversations: token lengths, truncation and masking exactly as training renders them."""
    prompt_lengths, response_lengths, total_lengths = [], [], []
    truncated, no_trainable, short, split = [], [], [], []
    trailer = trailing_text(tokenizer)
    n = dropped = 0  # records tokenised; their examples left with no trained token (training drops those)
    for record in records:
        try:
            turns = tokenize_conversation(tokenizer, record.messages, train_on_inputs=train_on_inputs,
                                          source=record.source, trailer=trailer, tools=record.tools)
        except UserError as err:
            errors.append(str(err))
            continue
        n += 1
        if len(turns) > 1:
            split.append(record.source)
        for ex in turns:
            trained = sum(1 for x in ex.labels if x != IGNORE_INDEX)
            response_lengths.append(trained)
            prompt_lengths.append(len(ex.input_ids) - trained)
            total_lengths.append(len(ex.input_ids))
        if any(len(ex.input_ids) > max_seq_length for ex in turns):
            truncated.append(record.source)
        # The same rule as training: position 0 is never predicted, and truncation comes first.
        lost = sum(not any(x != IGNORE_INDEX for x in ex.labels[1:max_seq_length]) for ex in turns)
        if lost:
            no_trainable.append(record.source)
            dropped += lost
        if len(record.messages[-1]["content"].split()) < SHORT_RESPONSE_WORDS:
            short.append(record.source)
    report["tokens"] = {"prompt": percentiles(prompt_lengths), "response": percentiles(response_lengths),
                        "total": percentiles(total_lengths)}
    report["examples"] = len(total_lengths)
    report["turn_by_turn"] = _counted(split, n)
    report["truncated"] = _counted(truncated, n)
    report["no_trainable_tokens"] = _counted(no_trainable, n)
    report["short_responses"] = {**_counted(short, n), "fewer_words_than": SHORT_RESPONSE_WORDS}
    if split:
        warnings.append(f"{len(split)} of {n} conversations are trained turn by turn ({len(total_lengths)} examples "
                        "in all): the chat template rewrites earlier turns as the conversation grows")
    if truncated:
        warnings.append(f"{len(truncated)} of {n} examples are longer than max_seq_length={max_seq_length} "
                        "and will be truncated")
    if dropped and dropped == len(total_lengths):
        errors.append(f"{data}: every example loses all its trained tokens at max_seq_length={max_seq_length} "
                      "(raise max_seq_length or shorten the prompts)")
    elif dropped:
        warnings.append(f"{dropped} examples keep no trained token after truncation and will be dropped")
    # Shown: a conversation trained turn by turn when there is one (its examples are the thing to check).
    shown_first = set(split[:1])
    ordered = sorted(records, key=lambda r: r.source not in shown_first)
    example = next((r for r in ordered if r.source not in set(no_trainable)), None)
    if example is not None and n:
        try:
            shown = rendered_examples(tokenizer, example, max_seq_length, train_on_inputs, trailer=trailer)
        except UserError:
            return  # already reported as an error above
        report["example"], report["example_turns"] = shown[0], shown[1:]


def _lint_pairs(data, records: list[Record], tokenizer, max_seq_length: int, report: dict, errors: list[str],
                warnings: list[str]) -> None:
    """Preference pairs: prompt and response lengths, truncation by training's rule, both sides of one pair shown."""
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": [], "longer side": []}
    truncated, lost = [], []
    trailer = trailing_text(tokenizer)
    for record in records:
        try:
            pair = tokenize_pair(tokenizer, record, trailer)
        except UserError as err:
            errors.append(str(err))
            continue
        trained = [sum(1 for x in s.labels if x != IGNORE_INDEX) for s in (pair, pair.rejected)]
        lengths["prompt"].append(len(pair.input_ids) - trained[0])
        lengths["chosen"].append(trained[0])
        lengths["rejected"].append(trained[1])
        lengths["longer side"].append(max(len(pair.input_ids), len(pair.rejected.input_ids)))
        cut, lost_prompt, lost_response = truncate_pair(pair, max_seq_length)
        if lost_prompt or lost_response:
            truncated.append(record.source)
        if any(not any(x != IGNORE_INDEX for x in s.labels[1:]) for s in (cut, cut.rejected)):
            lost.append(record.source)
    n = len(lengths["prompt"])
    report["tokens"] = {k: percentiles(v) for k, v in lengths.items()}
    report["truncated"] = {**_counted(truncated, n),
                           "rule": "prompt tokens go first, from the left; then both responses are cut alike"}
    report["no_trainable_tokens"] = _counted(lost, n)
    if truncated:
        warnings.append(f"{len(truncated)} of {n} pairs are longer than max_seq_length={max_seq_length} and will "
                        "be truncated (prompt tokens from the left first, then both responses alike)")
    if lost and len(lost) == n:
        errors.append(f"{data}: every pair loses a response at max_seq_length={max_seq_length} (raise "
                      "max_seq_length or shorten the prompts)")
    elif lost:
        warnings.append(f"{len(lost)} pairs keep no trained token on one side after truncation and will be dropped")
    example = next((r for r in records if r.source not in set(lost)), None)
    if example is not None and n:
        first = len(example.messages)
        for key, side in (("example", example.chosen), ("example_rejected", example.rejected)):
            report[key] = rendered_examples(tokenizer, Record(messages=example.messages + side,
                                                              source=example.source), max_seq_length, first=first,
                                            trailer=trailer)[0]


def _lint_texts(records: list[Record], fmt: str, tokenizer, max_seq_length: int, report: dict,
                warnings: list[str]) -> None:
    """Raw or labelled text: token lengths, truncation, the label counts."""
    lengths = [len(tokenizer(r.text, add_special_tokens=False)["input_ids"]) for r in records]
    report["tokens"] = {"text": percentiles(lengths)}
    truncated = sum(1 for x in lengths if x > max_seq_length)
    report["truncated"] = {"count": truncated, "share": _share(truncated, len(lengths))}
    if fmt == "classification":
        report["labels"] = dict(Counter(r.label for r in records).most_common())
        if len(report["labels"]) < 2:
            warnings.append(f"only {len(report['labels'])} label(s): a classifier needs two or more")
    warnings.append(f"format '{fmt}' has no conversations: `deltatune train` with task 'sft' needs chat records")


def _lint_duplicates(records: list[Record], texts: list[str], threshold: float, report: dict,
                     warnings: list[str]) -> None:
    dups = find_duplicates(texts, threshold)
    report["duplicates"] = {
        "exact": sum(d.kind == "exact" for d in dups), "near": sum(d.kind == "near" for d in dups),
        "threshold": threshold,
        "pairs": [{"record": records[d.index].source, "repeats": records[d.of].source, "kind": d.kind,
                   "similarity": d.similarity} for d in dups[:SHOWN]]}
    if dups:
        warnings.append(f"{len(dups)} records repeat an earlier one "
                        f"({report['duplicates']['exact']} exact, {report['duplicates']['near']} near)")


def _lint_validation(validation: str, fmt: str, records: list[Record], texts: list[str], threshold: float,
                     report: dict, errors: list[str], warnings: list[str], columns: dict | None = None) -> None:
    """Validation records that repeat training records make validation loss look better than it is."""
    val_errors: list[str] = []
    val_records, _, _ = _read(validation, fmt, val_errors, columns)
    errors += val_errors
    found = overlaps(texts, [record_text(r) for r in val_records], threshold)
    report["validation"] = {
        "file": str(validation), "records": len(val_records),
        "overlap_exact": sum(d.kind == "exact" for d in found),
        "overlap_near": sum(d.kind == "near" for d in found),
        "pairs": [{"record": val_records[d.index].source, "repeats": records[d.of].source, "kind": d.kind,
                   "similarity": d.similarity} for d in found[:SHOWN]]}
    if found:
        warnings.append(f"{len(found)} validation records repeat training records: validation loss will "
                        "look better than it is")


def _fmt_percentiles(stats: dict) -> str:
    return "  ".join(f"{k} {v}" for k, v in stats.items()) if stats else "-"


def print_report(report: dict, console=None) -> None:
    """Human-readable report; trained text highlighted on a terminal, in [[ ]] otherwise."""
    from rich.console import Console

    console = console or Console(highlight=False)

    def out(*parts, markup=False):
        console.print(*parts, markup=markup, soft_wrap=True)  # soft_wrap: never re-wrap lines in a pipe
    fmts = ", ".join(f"{k} {v}" for k, v in report["formats"].items())
    out(f"{report['data']}: {report['records']} valid records, format {report['format']} (lines by format: {fmts})")
    if "sampled" in report:
        out(f"token figures from a seeded sample of {report['sampled']['tokenised']} of {report['sampled']['of']} "
            "records (--sample; duplicates are checked among all)")
    if report["roles"]:
        out("turns by role: " + ", ".join(f"{k} {v}" for k, v in report["roles"].items()))
    for name, stats in report.get("tokens", {}).items():
        out(f"{name} tokens: {_fmt_percentiles(stats)}")
    t = report.get("truncated", {})
    out(f"truncated at max_seq_length={report['max_seq_length']}: {t.get('count', 0)} ({t.get('share', 0):.1%})"
        + (f"; {t['rule']}" if "rule" in t else ""))
    if "no_trainable_tokens" in report:
        z = report["no_trainable_tokens"]
        out(f"no trained token left: {z['count']} ({z['share']:.1%})")
    if report.get("turn_by_turn", {}).get("count"):
        tb = report["turn_by_turn"]
        out(f"trained turn by turn (one example per assistant turn): {tb['count']} conversations "
            f"({tb['share']:.1%}), {report['examples']} examples in all")
    if "short_responses" in report:
        s = report["short_responses"]
        out(f"responses under {s['fewer_words_than']} words: {s['count']} ({s['share']:.1%})"
            + (f" e.g. {', '.join(s['records'])}" if s["records"] else ""))
    if "labels" in report:
        out("labels: " + ", ".join(f"{k} {v}" for k, v in report["labels"].items()))
    d = report["duplicates"]
    out(f"duplicates: {d['exact']} exact, {d['near']} near (Jaccard >= {d['threshold']})")
    for p in d["pairs"]:
        out(f"  {p['record']} repeats {p['repeats']} ({p['kind']}, {p['similarity']})")
    if "validation" in report:
        v = report["validation"]
        out(f"validation {v['file']}: {v['records']} records, {v['overlap_exact']} exact and {v['overlap_near']} "
            "near repeats of training records")
        for p in v["pairs"]:
            out(f"  {p['record']} repeats {p['repeats']} ({p['kind']}, {p['similarity']})")
    turns = report.get("example_turns") or []
    for key, side in (("example", "turn 1 of " if turns else ""), ("example_rejected", "the rejected side of ")):
        if report.get(key):
            _print_example(out, console, report[key], side, report["max_seq_length"])
    for i, turn in enumerate(turns, 2):
        _print_example(out, console, turn, f"turn {i} of ", report["max_seq_length"])
    for w in report["warnings"]:
        out(f"warning: {w}")
    for e in report["errors"]:
        out(f"error: {e}")
    out(f"{len(report['errors'])} errors, {len(report['warnings'])} warnings")


def _print_example(out, console, example: dict, side: str, max_seq_length: int) -> None:
    from rich.text import Text

    out(f"\n{side}example {example['source']} as the model sees it (trained tokens "
        + ("highlighted" if console.is_terminal else f"in {MARK_OPEN} {MARK_CLOSE}") + "):")
    if console.is_terminal:
        text = Text(example["text"][: example["truncated_at"]] if example["truncated_at"] is not None
                    else example["text"])
        for start, end in example["trained_spans"]:
            text.stylize("bold black on green", start, end)
        out(text)
        if example["truncated_at"] is not None:
            out(f"✂ truncated here at max_seq_length={max_seq_length}")
    else:
        out(example["plain"])
