"""Atomic writes: write to a temporary file in the destination folder, then rename over the target.

A killed process leaves either the previous file or the complete new one, never a half-written file. What it may
leave is its temporary file, ``.<target name>.<host>-<pid>.<random>.part<suffix>``: :func:`sweep_stale` removes those
whose process is gone (``medseg predict`` sweeps its output folder on every run); one written on another machine
(a shared folder) is stale once it has not changed for an hour. :func:`check_output_dir` checks a folder
that a command will write to before the command computes anything.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator

from medseg.errors import MedsegError

# .<target>.<host>-<pid>.<8 random characters>.part<suffix>; files of older versions lack the host and pid
_PART = re.compile(r"^\..+?(?:\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+))?\.[A-Za-z0-9_]{8}\.part(?:\..*)?$")
OLD_PART_AGE_S = 3600.0  # a temporary file of another machine (or without a pid) is stale when unchanged this long


def host_tag() -> str:
    """Six hex digits naming this machine in temporary and lock files."""
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed to ``target``.

    ``suffix`` defaults to the target's full suffix (``.nii.gz``) so writers that choose a format by
    extension behave as for the target. On error the temporary file is removed.

    Example:
        >>> with atomic_path("out.csv") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("a,b\\n")
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{host_tag()}-{os.getpid()}.", suffix=f".part{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (possibly another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def stale_parts(folder: str | os.PathLike) -> list[Path]:
    """Temporary files of :func:`atomic_path` in ``folder`` left by processes that are gone (killed, crashed);
    those of running processes (another shard writing into the same folder) are not stale."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    now, here = time.time(), host_tag()
    for entry in folder.iterdir():
        m = _PART.match(entry.name)
        if not m or not entry.is_file():
            continue
        if m["pid"] is not None and m["host"] == here:
            if not pid_alive(int(m["pid"])):
                stale.append(entry)
        else:
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > OLD_PART_AGE_S:
                    stale.append(entry)
    return sorted(stale)


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove :func:`stale_parts` of ``folder``; returns what was removed."""
    removed = []
    for path in stale_parts(folder):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def check_output_dir(path: str | os.PathLike, what: str = "--output") -> Path:
    """A folder that a command will write to: an error naming ``what`` unless it is a writable folder or can be
    created (its nearest existing parent is a writable folder). Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedsegError(f"{what} {path}: an existing file, not a folder; give a folder (it is created when missing)")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise MedsegError(f"{what} {path}: {probe} is a file, so the folder cannot be created there; give another folder")
    if not _writable(probe):
        where = "" if probe == path else f" ({probe}, where it would be created)"
        raise MedsegError(f"{what} {path}: the folder is not writable{where}; fix its permissions or give another folder")
    return path


def _writable(folder: Path) -> bool:
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:  # access() says yes to root and on read-only mounts: try it
        fd, name = tempfile.mkstemp(prefix=".medseg-write-test.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True
