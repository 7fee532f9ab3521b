"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Content goes to a hidden staging name beside the target and is moved into place with one ``os.replace``, so an
interrupted write never leaves a half-written file or folder behind. Files and folders get the ordinary modes
(0o666 / 0o777 less the user's umask), like anything else the user creates.
"""
from __future__ import annotations

import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _staging_path(target: Path, suffix: str = "") -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def check_output_folder(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise now, before any expensive work, if ``target`` cannot be written as a new folder: it exists (and
    ``overwrite`` is false) or is a file, or its nearest existing parent is not a writable folder."""
    target = Path(target)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; choose another folder or pass overwrite=True (--overwrite).")
        if not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is a file, not a folder; choose another output folder.")
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"Cannot create {target}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot create {target}: {parent} is not writable by you; choose another output folder.")
    return target


def _give_files_the_default_mode(folder: Path) -> None:
    """chmod every file under ``folder`` to 0o666 less the umask (some writers, e.g. safetensors, create 0o600 files).
    The umask is read from a probe file rather than with ``os.umask``, which would change it for every thread."""
    probe = folder / ".mode-probe"
    probe.touch()
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


@contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``target`` in one rename, on failure it is removed.

    ``target`` is checked first (:func:`check_output_folder`); the files get the user's default mode.
    """
    target = check_output_folder(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_path(target)
    staging.mkdir()
    try:
        yield staging
        _give_files_the_default_mode(staging)
        if target.exists():
            retired = _staging_path(target, ".old")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, newline: str | None = None) -> Iterator[IO[str]]:
    """Yield a UTF-8 text handle; on success the file replaces ``path`` in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_path(path, ".tmp")
    try:
        with open(staging, "x", encoding="utf-8", newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(text)
    return Path(path)
