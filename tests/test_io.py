"""adapt.io.atomic_write(_json): a file is replaced whole or not at all, and no temporary file stays behind."""

import json

import numpy as np
import pytest

from adapt.io import atomic_write, atomic_write_json


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


def test_json_is_written_whole_as_utf8_with_a_final_newline(tmp_path):
    path = tmp_path / "extractor.json"
    path.write_text("old")
    data = {"name": "caf\u00e9", "regions": [36, 36]}
    atomic_write_json(path, data, indent=2)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == data and text.endswith("}\n") and '\n  "regions"' in text
    assert [p.name for p in tmp_path.iterdir()] == ["extractor.json"]
