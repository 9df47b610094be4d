"""A gallery built from real photos by ``python -m training.index``, killed and resumed, then served
by ``python app.py --gallery`` and searched through gradio_client; the same searches through the
in-memory gallery, the FAISS index and the Qdrant first stage."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage
import skimage.io

import app
from adapt import AdaptConfig, AdaptModel
from adapt.gallery import MemoryGallery
from adapt.pipeline import Retriever
from adapt.search import GalleryIndex, ImageDetails, QdrantFirstStage
from checkpoints import DEFAULT_CHECKPOINT
from conftest import app_process
from training import index as build

SKIMAGE = Path(skimage.__file__).parent / "data"
OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
PHOTOS = [SKIMAGE / "chelsea.png", SKIMAGE / "coffee.png", SKIMAGE / "rocket.jpg", SKIMAGE / "motorcycle_left.png",
          OPENCV / "messi5.jpg", OPENCV / "fruits.jpg", OPENCV / "butterfly.jpg", OPENCV / "squirrel_cls.jpg"]
# Captions the bundled model answers right on these photos (checked: the top hit by a wide margin).
ANSWERS = {"a cat": "chelsea.png", "a cup of coffee": "coffee.png", "a motorcycle": "motorcycle_left.png"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The real photos in one folder, and a broken file among them."""
    if not OPENCV.is_dir():
        pytest.skip("Debian's opencv-doc is not installed (.ci/run installs it)")
    folder = tmp_path_factory.mktemp("photos")
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return folder


def manifest_count(index: Path) -> int:
    try:
        return json.loads((index / "manifest.json").read_text())["count"]
    except (OSError, ValueError):
        return 0


def run_cli(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.index", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def built(photos, tmp_path_factory) -> tuple[Path, str]:
    """The index built by the CLI, killed once it had committed some images, then run again:
    the index folder and the second run's stderr."""
    index = tmp_path_factory.mktemp("gallery") / "index"
    args = ("--images", photos, "--out", index, "--batch-size", "1", "--commit-every", "2")
    first = run_cli(*args)
    deadline = time.monotonic() + 300
    while manifest_count(index) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, f"the first run ended by itself: {first.stderr.read()}"
    assert 2 <= manifest_count(index) < len(PHOTOS), "killed mid-way"
    second = run_cli(*args)
    _, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    return index, stderr


def test_the_cli_resumes_after_a_kill_with_nothing_lost_or_twice(built, photos):
    index, stderr = built
    opened = GalleryIndex.open(index, AdaptModel.from_pretrained(DEFAULT_CHECKPOINT))
    ids = [key for shard in opened.shards for key in shard.ids]
    assert sorted(ids) == sorted(p.name for p in PHOTOS), "every photo once"
    assert len(list((index / build.THUMBNAILS).glob("*.jpg"))) == len(PHOTOS)
    assert np.load(index / "shard-00000" / "regions.npy", mmap_mode="r").shape[0] == len(PHOTOS), "trimmed"
    assert (index / build.SKIPPED).read_text().startswith("broken.jpg\tbroken.jpg: ")
    assert "skipping broken.jpg: broken.jpg: " in stderr
    assert "img/s" in stderr and f"{len(PHOTOS)} images (" in stderr
    for caption, answer in ANSWERS.items():
        hit = opened.search([caption], top_k=1)[0][0]
        assert hit.key == answer and Path(hit.source).is_file()
        assert hit.regions.image_size == skimage.io.imread(photos / answer).shape[1::-1]
        assert len(hit.regions.labels) == len(hit.region_weights) == opened.n_regions
    # Growing: a new photo is added, the others are not added again.
    shutil.copy(OPENCV / "orange.jpg", photos / "orange.jpg")
    try:
        again = run_cli("--images", photos, "--out", index)
        _, stderr = again.communicate(timeout=600)
    finally:
        (photos / "orange.jpg").unlink()
    assert again.returncode == 0, stderr
    assert f"{len(PHOTOS) + 1} images (1 added now)" in stderr


def test_the_app_serves_the_gallery_and_finds_the_right_photo(built, tmp_path):
    index, _ = built
    with app_process({"ADAPT_GALLERY": str(index), "ADAPT_CACHE_DIR": str(tmp_path / "cache")}) as client:
        for caption, answer in ANSWERS.items():
            hits, status, drawing, shown = client.predict(caption, 3, api_name="/search_gallery")
            served = manifest_count(index)
            assert status == f"Searched **{served} images** ({served} served, 0 of yours)."
            assert len(hits) == 3 and shown.startswith(f"1. {answer} (") and "looked at" in shown
            assert Path(drawing).is_file()


def test_an_index_of_another_model_is_refused_naming_the_difference(built):
    config = AdaptModel.from_pretrained(DEFAULT_CHECKPOINT).config
    other = AdaptModel(AdaptConfig(**{**config.to_dict(), "lambda_t2i": config.lambda_t2i + 1}))
    served, problem = app.open_gallery(str(built[0]), other)
    assert served is None and problem.startswith("The gallery index is not served: ")
    assert f"lambda_t2i: index {config.lambda_t2i!r}, model {config.lambda_t2i + 1!r}" in problem
    assert "weights_sha256: index" in problem


@pytest.fixture(scope="module")
def retriever() -> Retriever:
    return Retriever.from_pretrained(DEFAULT_CHECKPOINT)


def test_memory_faiss_and_qdrant_galleries_give_the_same_hits_on_real_photos(photos, retriever, tmp_path):
    pytest.importorskip("qdrant_client")
    memory = MemoryGallery(retriever.model)
    regions = {p.name: retriever.regions(photos / p.name)[1] for p in PHOTOS}
    for key, r in regions.items():
        memory.add(key, r)
    stack = {name: np.stack([getattr(r, name) for r in regions.values()]) for name in ("features", "boxes")}
    details = [ImageDetails.of(r) for r in regions.values()]
    faiss_index = GalleryIndex.create(tmp_path / "faiss", retriever.model)
    qdrant_index = GalleryIndex.create(tmp_path / "qdrant", retriever.model,
                                       qdrant=QdrantFirstStage.connect("qdrant", "photos", tmp_path / "qdrant"))
    for index in (faiss_index, qdrant_index):
        index.add(stack["features"], stack["boxes"], list(regions), details)
    captions = [*ANSWERS, "a soccer ball", "a butterfly on a flower", "a squirrel", "fruits"]
    expected = memory.search(captions, top_k=5)
    assert [hits[0].key for hits in expected[:len(ANSWERS)]] == list(ANSWERS.values())
    for index in (faiss_index, qdrant_index):
        for mine, theirs in zip(index.search(captions, top_k=5), expected):
            assert [h.key for h in mine] == [h.key for h in theirs]
            np.testing.assert_allclose([h.score for h in mine], [h.score for h in theirs], atol=2e-3)
            np.testing.assert_allclose(mine[0].region_weights, theirs[0].region_weights, atol=5e-3)
            assert mine[0].regions.labels == theirs[0].regions.labels
    qdrant_index.close()


def test_a_features_folder_is_indexed_with_its_ids_and_boxes_and_resumed(retriever, photos, tmp_path):
    model = retriever.model
    n, k = 5, 4
    rng = np.random.default_rng(0)
    folder = tmp_path / "precomp"
    folder.mkdir()
    np.save(folder / "test_ims.npy", rng.normal(size=(n, k, model.config.region_dim)).astype(np.float32))
    np.save(folder / "test_boxes.npy", rng.uniform(0, 50, size=(n, k, 4)).astype(np.float32))
    names = [p.name for p in PHOTOS[:n]]
    (folder / "test_ids.txt").write_text("\n".join(names) + "\n")
    (folder / "extractor.json").write_text(json.dumps(model.config.extractor))
    index = GalleryIndex.create(tmp_path / "index", model)
    build.index_features(index, folder, "test", photos, commit_every=2)
    build.index_features(index, folder, "test", photos, commit_every=2)  # nothing left to add
    assert [key for s in index.shards for key in s.ids] == names
    hit = index.search_exhaustive(["a cat"], top_k=n)[0]
    np.testing.assert_array_equal(hit[0].regions.boxes, np.load(folder / "test_boxes.npy")[names.index(hit[0].key)])
    assert all(Path(h.source).is_file() for h in hit)
    (folder / "extractor.json").write_text(json.dumps({**model.config.extractor, "num_regions": 99}))
    with pytest.raises(build.IndexBuildError, match="num_regions"):
        build.index_features(index, folder, "test")
