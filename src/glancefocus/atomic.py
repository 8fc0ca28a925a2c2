"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target.

A reader (or a run killed at any moment) sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class WriteFailed(OSError):
    """A file could not be written (full disk, read-only file system, no permission); the
    message names the file. The file it was to replace, if any, is left as it was."""


def write_failure(path, exc: BaseException) -> WriteFailed:
    """A WriteFailed for `path` that says why in words a user can act on."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}
    reason = reasons.get(getattr(exc, "errno", None)) or getattr(exc, "strerror", None) or str(exc)
    failure = WriteFailed(f"cannot write '{path}': {reason}")
    failure.errno = getattr(exc, "errno", None)
    return failure


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` atomically. Any OSError
    on the way becomes a WriteFailed naming `path`; the old file stays whole."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except WriteFailed:
        raise
    except OSError as exc:
        raise write_failure(target, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except WriteFailed:
        raise
    except OSError as exc:
        raise write_failure(target, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
