"""Progress for every stage that takes more than a moment, on stderr (stdout stays the results).

On a terminal, a bar with the rate and the time left; elsewhere (CI logs, pipes) one plain line
when the stage ends, so logs stay readable: `tokenising train: 240 records in 1.3 s (185/s)`. A
stage that fails prints nothing (its error is the line that matters). DELTATUNE_PROGRESS=0
silences all of it, for scripts that want stderr to hold errors only.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager


@contextmanager
def stage(name: str, total: int | None = None, unit: str = "records"):
    """Yields advance(n=1); the stage's line (or bar) says how many `unit` it did, how fast."""
    done = [0]
    start = time.perf_counter()
    if os.environ.get("DELTATUNE_PROGRESS", "1") == "0":
        yield lambda n=1: None
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn(name), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} " + unit + "/s"),
                   TimeRemainingColumn()] if total else [TextColumn(name), TextColumn("{task.completed} " + unit)]
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(name, total=total)

            def advance(n: int = 1) -> None:
                done[0] += n
                bar.advance(task, n)
            yield advance
    else:
        def advance(n: int = 1) -> None:
            done[0] += n
        yield advance
    seconds = time.perf_counter() - start
    count = f"{done[0]} {unit} in " if done[0] else ""
    rate = f" ({done[0] / seconds:.0f}/s)" if done[0] and seconds > 0 else ""
    print(f"{name}: {count}{seconds:.1f} s{rate}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """A log line on stderr beside the stages' (silenced with them by DELTATUNE_PROGRESS=0)."""
    if os.environ.get("DELTATUNE_PROGRESS", "1") != "0":
        print(message, file=sys.stderr, flush=True)
