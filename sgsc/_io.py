"""Atomic file writes: every file sgsc writes appears whole under its final name or not at all."""

from __future__ import annotations

import glob
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None] | bytes) -> None:
    """Write ``path`` through a temporary file in the same directory, then rename it into place.

    ``write`` is the bytes to store or a function that writes to the open binary handle. The data
    is flushed to disk before the rename, so a crash leaves either the old file or the new one (and a
    temporary, which the next write of ``path`` removes: :func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(write, (bytes, bytearray)):
                handle.write(write)
            else:
                write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# A temporary without a writer's pid (written before pids were recorded) is stale after this long: no
# sgsc write takes minutes between creating its temporary and renaming it.
LEGACY_STALE_SECONDS = 15 * 60


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries that killed writes of ``path`` left beside it; returns those removed.

    A temporary is ``.<name>.<pid>.<random>.tmp``: it is stale when no process ``pid`` runs on this
    host (a concurrent writer's own temporary is never touched; a reused pid only keeps a stale file
    until that process ends). Names without a pid, from older versions, go once older than
    :data:`LEGACY_STALE_SECONDS`.
    """
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        middle = candidate.name[len(path.name) + 2 : -len(".tmp")]
        pid, dot, _ = middle.partition(".")
        try:
            if dot and pid.isdigit():
                stale = not _process_exists(int(pid))
            else:
                stale = time.time() - candidate.stat().st_mtime > LEGACY_STALE_SECONDS
            if stale:
                candidate.unlink()
                removed.append(candidate)
        except FileNotFoundError:  # another writer removed it first
            pass
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # none, or a number no pid can be
        return False
    except PermissionError:  # another user's process
        return True
    return pid > 0  # 0 would name our own process group


def _umask() -> int:
    # Read, not set-and-restore: os.umask would briefly change it for every thread of the process.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
