"""From examples to batches: an epoch's seeded steps, micro-batches, padding, and packing.

An epoch's order depends on the seed and epoch only; each optimizer step's examples are then
cut into micro-batches of similar length (less padding), or packed.

Padding-free packing: several examples per row, none of them able to see another.

A step's examples are packed first-fit-decreasing into rows of `ROW_TOKENS` (at least the
step's longest example), and the rows are cut into micro-batches so that one holds at most
`per_device_train_batch_size x longest` token slots: the same budget as the unpacked batch of
that step, with the padding squeezed out. Packing never moves an example to another step, and
the loss stays normalised by the label tokens of the whole step, so a packed run takes the same
optimizer steps as an unpacked one, up to float rounding.

Isolation comes from the position ids alone, which restart at 0 for each example (and for each
padding token): given position ids and no attention mask, transformers finds the examples of a
row and builds the mask its attention implementation takes, so the row's memory is linear in its
length where the kernel takes packed sequences (FlashAttention's varlen path, flex attention's
block mask) and a dense boolean [rows, 1, L, L] mask only where the kernel needs one (SDPA, eager).
That holds without a KV cache, as training runs. The first token of each example gets no label:
it must not be predicted from the previous example.
"""

from __future__ import annotations

import random

import torch

from deltatune.data.examples import IGNORE_INDEX, Example

# Row length for short examples. Longer rows squeeze out more padding, but a dense attention mask
# (SDPA, eager) makes attention cost grow with the row length squared: for a 576-wide model at 512 tokens the
# wasted attention is at most ~7% of a layer's matmuls. Shorter rows cost more: at 256, most
# steps of 4 short conversations needed a second pass of a few dozen tokens (slower: benchmarks/RESULTS.md).
ROW_TOKENS = 512


def rows_of(ex: Example) -> list[Example]:
    """The rows an example fills in a batch: a preference pair fills two, chosen then rejected."""
    return [ex] if ex.rejected is None else [ex, ex.rejected]


def longest_row(ex: Example) -> int:
    """The example's longest row."""
    return max(len(row.input_ids) for row in rows_of(ex))


def real_tokens(ex: Example) -> int:
    """Tokens the example feeds forward (padding excluded)."""
    return sum(len(row.input_ids) for row in rows_of(ex))


def pack_rows(indices: list[int], examples: list[Example], capacity: int) -> list[list[int]]:
    """First-fit decreasing: each row's examples fit in `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -len(examples[i].input_ids)):
        n = len(examples[i].input_ids)
        if n > capacity:
            raise ValueError(f"example {i} ({n} tokens) is longer than the row capacity {capacity}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def packed_micro_batches(indices: list[int], examples: list[Example], batch_size: int,
                         row_tokens: int = ROW_TOKENS) -> list[list[list[int]]]:
    """A step's examples as micro-batches of packed rows.

    Token budget per micro-batch: batch_size x the step's longest example (what the unpacked
    micro-batch would occupy). Row capacity: `row_tokens`, raised to the longest example and
    capped at the budget; each micro-batch holds budget // capacity rows.
    """
    longest = max(len(examples[i].input_ids) for i in indices)
    budget = batch_size * longest
    capacity = min(budget, max(longest, row_tokens))
    rows = pack_rows(indices, examples, capacity)
    per_batch = max(1, budget // capacity)
    return [rows[i: i + per_batch] for i in range(0, len(rows), per_batch)]


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, labels and position_ids [rows, L]; no attention mask: the positions say where each example
    starts (a padding token is position 0, an example of its own that nothing attends to)."""
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            n = len(ex.input_ids)
            input_ids[r, start: start + n] = torch.tensor(ex.input_ids)
            labels[r, start + 1: start + n] = torch.tensor(ex.labels[1:])  # never predict across a boundary
            positions[r, start: start + n] = torch.arange(n)
            start += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def step_groups(n_examples: int, examples_per_step: int, seed: int, epoch: int, shuffle: bool = True
                ) -> list[list[int]]:
    """Shuffled example indices for one epoch (in order: `shuffle` false), cut into optimizer steps.

    The order depends on the seed and epoch only, not on how a step is split into
    micro-batches, so batch 8 x accumulation 1 and batch 2 x accumulation 4 see the same data.
    """
    order = list(range(n_examples))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i: i + examples_per_step] for i in range(0, n_examples, examples_per_step)]


def micro_batches(indices: list[int], examples: list[Example], batch_size: int,
                  max_tokens: int | None = None) -> list[list[int]]:
    """Split a step's examples into micro-batches of similar length (less padding, same step)."""
    return _cut_sorted(sorted(indices, key=lambda i: longest_row(examples[i])), examples, batch_size, max_tokens)


def _cut_sorted(order: list[int], examples: list[Example], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Cut indices sorted by length into batches of at most batch_size examples and, when
    max_tokens is set, at most max_tokens padded tokens (rows x longest): long examples
    then travel in smaller batches, so peak memory is bounded by tokens, not by example count."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = longest_row(examples[i])  # ascending order: the newcomer is the longest
        slots = (len(current) + 1) * len(rows_of(examples[i])) * longest
        if current and (len(current) == batch_size or (max_tokens and slots > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding gets attention 0 and label IGNORE_INDEX (and token type
    0, where the examples carry token types). A preference pair fills two rows side by side, chosen
    then rejected (so row 2i is pair i's chosen side and row 2i+1 its rejected side), with
    `reference_logps` per row where the examples carry them."""
    batch = [row for ex in examples for row in rows_of(ex)]
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    types = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention[row, :n] = 1
        if ex.token_type_ids is not None:
            types[row, :n] = torch.tensor(ex.token_type_ids)
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if any(ex.token_type_ids is not None for ex in batch):
        out["token_type_ids"] = types
    if batch[0].reference_logp is not None:
        out["reference_logps"] = torch.tensor([ex.reference_logp for ex in batch], dtype=torch.float64)
    return out


def length_batches(examples: list[Example], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Evaluation batches of similar lengths (order does not matter for a summed loss)."""
    order = sorted(range(len(examples)), key=lambda i: longest_row(examples[i]))
    return _cut_sorted(order, examples, batch_size, max_tokens)
