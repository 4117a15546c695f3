"""Writing directories so that an interrupted write never leaves a half-written one.

Every directory hf_repair writes (a saved repair, a repaired model, a report) is built in a
temporary sibling directory and renamed into place only once it is complete: a crash, a
`KeyboardInterrupt` or a full disk leaves the target as it was (at most a hidden
`.NAME.tmp-*` sibling behind after a hard kill). Renames within one directory are atomic on
POSIX file systems.

A writer holds an advisory lock (`flock`) on its staging path for as long as it writes, so the
next write to the same place can tell a staging sibling left by a killed writer (no lock: it is
deleted) from one a live writer is still filling (locked: left alone).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; stale staging siblings are then left for the user to delete
    fcntl = None

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def check_output_directory(path: PathLike, overwrite: bool = False) -> None:
    """Refuse a target that is a file, or a non-empty directory unless `overwrite`.

    Called before any work starts (so a long repair does not end in a refused write) and again
    right before the rename.
    """
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise NotADirectoryError(f"{target} exists and is not a plain directory (a file or a symlink); choose another path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty; choose a new directory or pass overwrite=True "
            f"(--overwrite on the command line) to replace it."
        )


@contextmanager
def atomic_directory(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` when the block succeeds.

    On any exception the temporary directory is deleted and `path` is untouched. With
    `overwrite=True` an existing `path` is moved aside, replaced, and only then deleted, so a
    failure at the last step puts the old directory back. Run it on one process only (e.g.
    `if PartialState().is_main_process:`).

    Example:
        >>> with atomic_directory("out/repaired") as tmp:
        ...     model.save_pretrained(tmp)
    """
    target = Path(path).absolute()
    check_output_directory(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = _sibling(target, "tmp")
    staging.mkdir()  # not tempfile.mkdtemp: its 0o700 mode would end up on the final directory
    try:
        with _locked(staging):
            yield staging
            _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write a file through a temporary sibling and `os.replace`, so readers never see half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = _sibling(target, "tmp")
    try:
        with open(staging, "w", encoding="utf-8") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_json(path: PathLike, data: Any) -> None:
    """`atomic_write_text` of indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_stale_staging(target: PathLike) -> list[Path]:
    """Delete the `.NAME.tmp-*` staging siblings of `target` whose writer is gone; return what was deleted.

    A live writer holds a lock on its staging path, so only siblings nobody locks are deleted
    (left by a killed process: a crash, `kill -9`, an out-of-memory kill). Backups (`.NAME.old-*`)
    are never touched: after a kill between the two renames of an overwrite, one holds the old data.
    """
    if fcntl is None:
        return []
    target = Path(target)
    removed = []
    for candidate in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer
        finally:
            os.close(fd)
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    if removed:
        logger.info("Removed %d staging sibling(s) of %s left by interrupted writes: %s", len(removed), target,
                    [p.name for p in removed])
    return removed


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (a directory too) for the block; released if the process dies."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    check_output_directory(target, overwrite)  # something may have appeared while we wrote
    if not target.exists():
        os.rename(staging, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.rename(staging, target)
        return
    backup = _sibling(target, "old")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
