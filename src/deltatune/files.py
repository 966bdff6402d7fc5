"""File helpers every layer shares: content hashes, fsync, OS errors as one line, a run's folder lock.

Checkpoints list each file's SHA-256 in their manifest, and the GGUF conversion cache is keyed
by the file's hash: one way to hash a file, so both read it the same way. A write that meets a
full disk, a read-only file system or a denied permission stops with one line naming what was
being written (and, for a full disk, its size and the free space), never a traceback. A run
holds an exclusive lock on its output folder for its whole life, so two runs never write into
one folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from deltatune.errors import UserError


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MB chunks (weight files do not fit a single read)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk before anything relies on them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- OS errors a user meets: one line each ------------------------------------------------------

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def existing_parent(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists (where a new file would land)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(existing_parent(folder)).free


def no_space(what: str, folder: Path, size: int | None, hint: str) -> UserError:
    need = f"{human_bytes(size)} to write, " if size else ""
    return UserError(f"{what}: no space left on the device ({need}{human_bytes(free_bytes(folder))} free in "
                     f"{existing_parent(folder)}); {hint}")


def check_space(what: str, folder: Path, size: int, hint: str) -> None:
    """Refuse a write that cannot finish, before it starts (a 5% margin for file headers and metadata)."""
    if size * 1.05 > free_bytes(folder):
        raise no_space(what, folder, size, hint)


def is_no_space(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library wrapped it (safetensors raises its own error with the OS text)."""
    return (isinstance(err, OSError) and err.errno in NO_SPACE) or "No space left on device" in str(err) \
        or "Disk quota exceeded" in str(err)


def os_error_line(what: str, err: OSError) -> UserError:
    """Permission denied, a read-only file system, a path that is a file: what was written, and where."""
    where = err.filename or what
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the file system is read-only", errno.ENOTDIR: "a part of the path is a file",
               errno.EEXIST: "it exists and is not a folder", errno.EISDIR: "it is a folder"}
    reason = reasons.get(err.errno, err.strerror or str(err))
    return UserError(f"{what}: cannot write {where} ({reason}); choose a writable folder")


@contextmanager
def writing(what: str, folder: Path, size: int | None = None, hint="free some space and run again"):
    """Turn the OS errors of a write into one line naming what was being written: out of space (with
    the size and the free space), permission denied, read-only. Anything else is a bug and propagates.
    `hint`: what to do next, or a function that says it (called only when the write failed)."""
    try:
        yield
    except Exception as err:
        if is_no_space(err):
            raise no_space(what, folder, size, hint() if callable(hint) else hint) from None
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
            raise os_error_line(what, err) from None
        raise


def inject_write_fault(point: str, step: int | None = None) -> None:
    """Tests set DELTATUNE_TEST_ENOSPC=POINT[:STEP] (checkpoint, final, report, cache, prepare) to
    fail that write as a full disk does, where no small file system can be mounted."""
    want, _, at = os.environ.get("DELTATUNE_TEST_ENOSPC", "").partition(":")
    if want == point and (not at or int(at) == step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- one run per output folder ------------------------------------------------------------------

LOCK_FILE = ".deltatune.lock"


def has_content(folder: Path) -> bool:
    """Whether a folder holds anything besides a run's lock file."""
    return any(p.name != LOCK_FILE for p in Path(folder).iterdir())


class FolderLock:
    """An exclusive lock for a process's whole life. The kernel drops it when the process ends,
    however it ends: a killed run leaves no stale lock."""

    def __init__(self, path: Path, fd: int | None, created_folder: bool = False):
        self.path, self.fd, self.created_folder = path, fd, created_folder

    def release(self) -> None:
        """Remove the lock file (still holding the lock) and unlock; a folder created for the lock
        alone goes too. A process that opened the old file meanwhile finds it gone and retries."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            if self.created_folder and not has_content(self.path.parent):
                self.path.parent.rmdir()
        except OSError:
            pass  # the folder is gone, or another run has just created its own lock file there
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that left no details"


def _acquire(lock_path: Path, what: str, subject: str) -> int | None:
    """The open, locked lock file (None where the platform has no advisory locks)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: runs are not guarded
        return None
    for _ in range(10):  # retried only when the lock file was replaced between open and lock
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{what} '{subject}' is in use by another deltatune run ({_holder(lock_path)}); "
                            f"wait for it to end, or choose another {what}") from None
        if os.path.exists(lock_path) and os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
            break
        os.close(fd)
    else:
        raise UserError(f"{what} '{subject}': its lock file keeps being replaced by another process; try again")
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    return fd


def lock_folder(folder: Path, what: str = "output_dir") -> FolderLock:
    """Take `folder`'s lock (creating the folder); one line and no waiting when another process has it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} '{folder}' is a file (choose a folder path)")
    created = not folder.exists()
    with _as_lines(what, folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(folder / LOCK_FILE, what, str(folder))
    return FolderLock(folder / LOCK_FILE, fd, created_folder=created)


def lock_output_file(out: Path, what: str = "--out") -> FolderLock:
    """Take the lock of an output file (a hidden `.NAME.lock` beside it, removed when done)."""
    out = Path(out)
    created = not out.parent.exists()
    with _as_lines(what, out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(out.with_name(f".{out.name}.lock"), what, str(out))
    return FolderLock(out.with_name(f".{out.name}.lock"), fd, created_folder=created)


@contextmanager
def _as_lines(what: str, folder: Path):
    try:
        yield
    except FileExistsError as err:
        raise os_error_line(what, err) from None
    except OSError as err:
        if is_no_space(err):
            raise no_space(what, folder, None, "free some space and run again") from None
        raise os_error_line(what, err) from None
