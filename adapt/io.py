"""Replacing a file all at once: readers, and a machine that loses power, see the old file or the new."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Replace ``path`` with the file that ``write(temporary)`` writes at ``temporary``.

    ``temporary`` is a fresh name in the same folder that keeps the suffix of ``path`` (so
    ``np.savez`` adds none). It is synced to disk, renamed over ``path`` (atomic on POSIX and
    Windows) and the folder is synced, so the rename itself survives a crash. If ``write`` raises,
    ``path`` is left as it was and the temporary file is removed.

    Example::

        atomic_write(folder / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest)))
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder; NTFS journals the rename itself
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
