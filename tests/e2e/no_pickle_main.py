"""`python tests/no_pickle_main.py ARGS...` runs `deltatune ARGS...` with every way of reading a pickle refused.

test_distributed_resume.py runs a resume under torchrun through it: pickle.load (what DCP's
default FileSystemReader uses for its `.metadata` file), a pickle.Unpickler on anything but
bytes in memory, and torch.load all raise, and each attempt is also appended to the file named
by $DELTATUNE_PICKLE_LOG, so an attempt is seen even if some library caught the exception.
(torch.distributed hands objects between ranks as pickled bytes in memory: allowed.)
"""

import io
import os
import pickle
import sys

import torch


class PickleRefused(RuntimeError):
    pass


def _refuse(what: str):
    def refuse(*args, **kwargs):
        with open(os.environ["DELTATUNE_PICKLE_LOG"], "a", encoding="utf-8") as log:
            log.write(f"{what} {args[:1]!r}\n")
        raise PickleRefused(f"{what}: no pickle may be read here")
    return refuse


class InMemoryOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, *args, **kwargs):
        if not isinstance(file, io.BytesIO):
            _refuse("pickle.Unpickler")(file)
        super().__init__(file, *args, **kwargs)


def install() -> None:
    pickle.load = _refuse("pickle.load")
    pickle.Unpickler = InMemoryOnlyUnpickler
    torch.load = torch.serialization.load = _refuse("torch.load")


def main() -> int:
    install()
    log = os.environ["DELTATUNE_PICKLE_LOG"]
    probe_log = f"{log}.probe-{os.getpid()}"  # the guards must really fire; this is not the watched log
    os.environ["DELTATUNE_PICKLE_LOG"] = probe_log
    with open(__file__, "rb") as some_file:
        for attempt in (lambda: pickle.load(io.BytesIO(pickle.dumps(1))), lambda: torch.load(io.BytesIO(b"x")),
                        lambda: pickle.Unpickler(some_file)):
            try:
                attempt()
            except PickleRefused:
                continue
            raise SystemExit("no_pickle_main: a pickle guard did not fire")
    os.remove(probe_log)
    os.environ["DELTATUNE_PICKLE_LOG"] = log

    from deltatune.cli import main as deltatune_main

    return deltatune_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
