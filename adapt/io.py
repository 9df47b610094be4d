"""Replacing a file all at once (readers, and a machine that loses power, see the old file or the
new), JSON files included, resizing a ``.npy`` array in place, and keeping files within a size."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Container, Iterable

import numpy as np
from numpy.lib import format as npy_format


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Replace ``path`` with the file that ``write(temporary)`` writes at ``temporary``.

    ``temporary`` is a fresh name in the same folder that keeps the suffix of ``path`` (so
    ``np.savez`` adds none). It is synced to disk, renamed over ``path`` (atomic on POSIX and
    Windows) and the folder is synced, so the rename itself survives a crash. If ``write`` raises,
    ``path`` is left as it was and the temporary file is removed.

    Example::

        atomic_write(folder / "ann.faiss", lambda tmp: faiss.write_index(index, str(tmp)))
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


def atomic_write_json(path: str | Path, data: Any, indent: int = 1) -> None:
    """Replace ``path`` with ``data`` as UTF-8 JSON (``indent`` spaces, a final newline), all at
    once (:func:`atomic_write`): readers see the old file or the new one, never half of it."""
    text = json.dumps(data, indent=indent) + "\n"
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _sync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder; NTFS journals the rename itself
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def resize_npy(path: str | Path, rows: int) -> None:
    """Give the ``.npy`` array at ``path`` ``rows`` rows in place: its header is rewritten and the
    file cut or extended (new rows read as zeros and take no disk until written: a sparse file).

    Raises:
        ValueError: the header cannot be rewritten in place (numpy pads it for this; a file of
            another writer may not be).
    """
    with open(path, "r+b") as f:
        version = npy_format.read_magic(f)
        read_header, write_header = ((npy_format.read_array_header_1_0, npy_format.write_array_header_1_0)
                                     if version == (1, 0) else
                                     (npy_format.read_array_header_2_0, npy_format.write_array_header_2_0))
        shape, fortran_order, dtype = read_header(f)
        header_size = f.tell()
        if shape[0] == rows:
            return
        f.seek(0)
        # numpy pads headers so the first axis can shrink or grow in place; check it did.
        write_header(f, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": fortran_order,
                         "shape": (rows, *shape[1:])})
        if f.tell() != header_size:
            raise ValueError(f"{path}: cannot rewrite the array header in place")
        f.truncate(header_size + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def delete_oldest(paths: Iterable[str], max_bytes: int, keep: Container[str] = ()) -> list[str]:
    """Delete the oldest of ``paths`` (by modification time; never those in ``keep``, which still
    count) until all of them together take at most ``max_bytes``; returns the deleted paths.

    A file that disappears meanwhile (another process or thread sharing the folder) is skipped.
    """
    files, total = [], 0
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        total += stat.st_size
        if path not in keep:
            files.append((stat.st_mtime_ns, stat.st_size, path))
    deleted = []
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        Path(path).unlink(missing_ok=True)
        total -= size
        deleted.append(path)
    return deleted
