"""Test hooks: fail, hang or die on purpose at a named point, so crash handling can be tested.

Both are inert unless their environment variable is set: `DELTATUNE_TEST_FAULT` (a rank raises
or hangs at a step: a broken rank must end the job, not hang it) and `DELTATUNE_TEST_KILL`
(the process signals itself at a point of the loop or the checkpoint write: resume must
continue bit for bit whatever instant a run died at).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from deltatune.runtime.distributed import rank

# Test hook: "RANK:STEP" makes that rank raise at that step, "RANK:STEP:hang" makes it stop
# responding, so tests can check that a broken rank ends the job rather than hanging it.
FAULT_ENV = "DELTATUNE_TEST_FAULT"


def inject_fault(step: int) -> None:
    """Fail on purpose where DELTATUNE_TEST_FAULT says (tests of crash handling only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != rank() or int(parts[1]) != step:
        return
    if parts[2:] == ["hang"]:
        print(f"rank {rank()}: {FAULT_ENV} hangs at step {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)
    raise RuntimeError(f"rank {rank()}: failure injected by {FAULT_ENV} at step {step}")


def crash_point(point: str, step: int) -> None:
    """Crash-safety tests set DELTATUNE_TEST_KILL=POINT:STEP[:SIGNAL] to signal this process here
    (under torchrun: every rank that gets there, or only rank DELTATUNE_TEST_KILL_RANK)."""
    spec = os.environ.get("DELTATUNE_TEST_KILL")
    if spec and os.environ.get("DELTATUNE_TEST_KILL_RANK", str(rank())) == str(rank()):
        want_point, want_step, *sig = spec.split(":")
        if want_point == point and int(want_step) == step:
            os.kill(os.getpid(), getattr(signal, sig[0]) if sig else signal.SIGKILL)
