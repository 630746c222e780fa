"""One writer per folder: an exclusive lock on a file inside it, held for a writer's whole life.

``fcntl.flock`` on ``DIR/.lock``: the kernel drops the lock when its holder exits, however it ends
(even ``kill -9``), so a lock is never stale; the file records who holds it (pid and host) for the
error a second writer gets. The file is removed on release; a writer that locked a file removed
meanwhile (its inode no longer at the path) tries again, so two writers never hold "the" lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from fedrir.errors import FedrirError

LOCK_FILE = ".lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "a process that is starting"


def _acquire(folder: Path) -> int:
    path = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FedrirError(f"cannot lock {folder} ({e.strerror}); pick another folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FedrirError(
                f"{folder} is in use by another fedrir process ({_holder(path)}); wait for it "
                "to end, or pick another folder"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as it let go: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder`` (which must exist) as its only writer, or say in one line who does."""
    fd = _acquire(folder)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / LOCK_FILE).unlink()
        os.close(fd)


def contents(folder: Path) -> list[Path]:
    """What ``folder`` holds besides a lock file."""
    return [p for p in folder.iterdir() if p.name != LOCK_FILE]
