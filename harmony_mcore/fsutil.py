"""Atomic writes. Directories: built under `<final>.partial`, then renamed; a reader never sees a half-written
directory, and a crash leaves only a `.partial` sibling that readers ignore and the next writer removes. Files:
`atomic_file`, a temporary sibling renamed over the target."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

PARTIAL_SUFFIX = ".partial"


def partial_path(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(final.name + PARTIAL_SUFFIX)


def begin_atomic_dir(final: str | Path, *, overwrite: bool = False) -> Path:
    """Create a fresh `<final>.partial` directory to write into (removing a stale one)."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: output directory already exists (refusing to overwrite)")
    tmp = partial_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_atomic_dir(final: str | Path) -> Path:
    """fsync and rename `<final>.partial` to `<final>` (replacing `final` only if it exists and was allowed)."""
    final = Path(final)
    tmp = partial_path(final)
    for root, _dirs, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    if final.exists():
        old = final.with_name(final.name + ".old")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)
    return final


def abort_atomic_dir(final: str | Path) -> None:
    shutil.rmtree(partial_path(final), ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Single-process form: `with atomic_dir(out) as tmp: write into tmp` -> renamed on success only."""
    tmp = begin_atomic_dir(final, overwrite=overwrite)
    try:
        yield tmp
    except BaseException:
        abort_atomic_dir(final)
        raise
    commit_atomic_dir(final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[TextIO]:
    """A text file (UTF-8) that appears at `path` complete, or not at all: written to a temporary file beside it
    and renamed over it on success; removed on failure."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
