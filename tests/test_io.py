"""adapt.io.atomic_write: a file is replaced whole or not at all, and no temporary file stays behind."""

import numpy as np
import pytest

from adapt.io import atomic_write


def test_the_new_content_replaces_the_old_and_keeps_its_suffix(tmp_path):
    path = tmp_path / "regions.npz"
    path.write_bytes(b"old")
    atomic_write(path, lambda tmp: np.savez(tmp, x=np.arange(3)))  # np.savez would add ".npz" to another suffix
    with np.load(path) as data:
        np.testing.assert_array_equal(data["x"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["regions.npz"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")

    def write_half(tmp):
        tmp.write_text("half a manif")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write_half)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
