"""The bundled default model: loads offline, ranks true captions of real photos first, serves the app."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skimage_data

from adapt import AdaptModel
from adapt.pipeline import DEFAULT_CHECKPOINT, Retriever

ROOT = Path(__file__).resolve().parents[1]
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")  # Debian's opencv-doc (.ci/run installs it)

# Real photos that packages ship, each with one true caption in the words of the training data.
# Chosen by looking at the photos, before the model saw them; never tuned on the model's output.
PHOTOS = {
    "skimage coffee": (lambda: Image.fromarray(skimage_data.coffee()), "a mug"),
    "opencv apple.jpg": (lambda: OPENCV_DATA / "apple.jpg", "a red apple"),
    "opencv orange.jpg": (lambda: OPENCV_DATA / "orange.jpg", "an orange"),
    "opencv butterfly.jpg": (lambda: OPENCV_DATA / "butterfly.jpg", "a butterfly"),
    "opencv messi5.jpg": (lambda: OPENCV_DATA / "messi5.jpg", "a soccer ball"),
    "opencv fruits.jpg": (lambda: OPENCV_DATA / "fruits.jpg", "a sliced orange and a sliced lime"),
    "opencv basketball1.png": (lambda: OPENCV_DATA / "basketball1.png", "a basketball"),
}


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


@pytest.fixture(scope="module")
def retriever():
    return Retriever.from_pretrained(DEFAULT_CHECKPOINT)


def test_real_photos_rank_their_true_caption_first(retriever):
    if not OPENCV_DATA.is_dir():
        pytest.skip("Debian's opencv-doc is not installed (.ci/run installs it)")
    captions = [caption for _, caption in PHOTOS.values()]
    hits = []
    for name, (load, truth) in PHOTOS.items():
        ranked = retriever.rank_captions(load(), captions)
        hits.append(ranked.captions[0] == truth)
        print(f"{name:24s} true: {truth!r:40s} ranked first: {ranked.captions[0]!r}")
    rate = sum(hits) / len(hits)
    print(f"true caption first for {sum(hits)}/{len(hits)} photos ({rate:.0%}; chance {1 / len(hits):.0%})")
    assert rate > 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_run_command_serves_the_bundled_model_offline(tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ADAPT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("ADAPT_CHECKPOINT", None)
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200 and "ADAPT" in response.read().decode()
                    return
            except OSError:
                time.sleep(2)
        pytest.fail("the app did not answer within 240 s")
    finally:
        server.terminate()
        server.wait(timeout=30)
