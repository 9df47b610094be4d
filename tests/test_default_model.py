"""The bundled default model: loads offline, is small, carries its card, serves the app (its real-photo
checks are in test_real_photos.py)."""

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from adapt import AdaptModel
from checkpoints import DEFAULT_CHECKPOINT
from conftest import app_process

ROOT = Path(__file__).resolve().parents[1]


def test_default_checkpoint_loads_in_a_fresh_offline_interpreter():
    code = ("from adapt import AdaptModel; m = AdaptModel.from_pretrained('checkpoints/default');"
            "print(m.config.similarity, m.config.extractor['name'])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ssd-mobilenet-v2+efficientnet-lite0" in result.stdout


def test_default_checkpoint_is_small_and_carries_its_card():
    files = list(DEFAULT_CHECKPOINT.iterdir())
    assert sum(f.stat().st_size for f in files) < 30 * 2**20
    card = (DEFAULT_CHECKPOINT / "README.md").read_text(encoding="utf-8")
    assert "rsum" in card and "baseline" in card.lower()
    assert AdaptModel.from_pretrained(DEFAULT_CHECKPOINT).config.extractor is not None


def test_the_readme_run_command_serves_the_bundled_model_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPT_CHECKPOINT", raising=False)
    with app_process({"HF_HUB_OFFLINE": "1", "ADAPT_CACHE_DIR": str(tmp_path / "cache")}, timeout=240) as client:
        with urllib.request.urlopen(client.src, timeout=30) as response:
            assert response.status == 200 and "ADAPT" in response.read().decode()
