"""Training examples prepared as training reads them (`streaming: true`), for data bigger than the disk cache.

The records are read from the source in file order, JSONL line by line, through a seeded shuffle
buffer (a fresh seed each pass), and tokenised one at a time: nothing is cached, and memory holds
the buffer and the examples of the last few steps only. The loop sees an `ExampleStream`, indexed by
an example's position in that seeded order, which it asks for in increasing order, a step at a time;
a resumed run asks for the position its checkpoint stopped at and the stream gets there by reading
(and tokenising) again from the start: the same examples, in the same order, at the cost of the
skipped examples' tokenisation.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

from deltatune.data.examples import DatasetStats, Example, no_examples_left
from deltatune.data.formats import Record

SHUFFLE_BUFFER = 10_000  # records: wide enough to mix neighbouring lines, small enough to stay in memory
KEEP = 4096  # examples behind the last one asked for that stay readable (a step asks for its own again)


def shuffled(items: Iterable, buffer: int, seed: int) -> Iterator:
    """The items in a seeded order that only ever holds `buffer` of them: each new item takes the place of a
    randomly chosen held one, which is given out."""
    rng, held = random.Random(seed), []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        i = rng.randrange(buffer)
        yield held[i]
        held[i] = item
    rng.shuffle(held)
    yield from held


class ExampleStream(Sequence):
    """The examples of an endless seeded stream of passes over the training records.

    `read()` gives one pass's records in file order; `make([record], stats)` a record's examples; `length`
    is how many positions the run will ask for (max_steps x examples per step); `key` names the data
    and settings for the resume check."""

    def __init__(self, read: Callable[[], Iterable[Record]],
                 make: Callable[[list[Record], DatasetStats], list[Example]], length: int, seed: int, key: str,
                 name: str, max_seq_length: int, buffer: int = SHUFFLE_BUFFER):
        self.read, self.make, self.length, self.seed, self.key = read, make, length, seed, key
        self.name, self.max_seq_length, self.buffer = name, max_seq_length, buffer
        self.stats = DatasetStats()  # of the examples made so far (reported when the run ends)
        self.restart()

    def restart(self) -> None:
        self.examples, self.held, self.next_position = self.passes(), {}, 0

    def passes(self) -> Iterator[Example]:
        for epoch in itertools.count():
            made = 0
            for record in shuffled(self.read(), self.buffer, self.seed * 100_003 + epoch):
                for example in self.make([record], self.stats):
                    made += 1
                    yield example
            if made == 0:
                raise no_examples_left(self.name, self.max_seq_length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> Example:
        if not 0 <= position < self.length:
            raise IndexError(position)
        if position < self.next_position and position not in self.held:
            self.restart()  # behind what is held (a resume): read again from the start
        while self.next_position <= position:
            self.held[self.next_position] = next(self.examples)
            self.held.pop(self.next_position - KEEP, None)
            self.next_position += 1
        return self.held[position]

    def __iter__(self):
        return (self[i] for i in range(self.length))

    def fingerprint(self, digest) -> None:
        """What the resume check hashes: the source's bytes and every setting, not the endless examples."""
        digest.update(self.key.encode())
