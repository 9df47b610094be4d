"""training.recipe end to end, offline: a Hub-layout dataset folder -> prepare -> bottom-up-attention
features -> T2I and I2T training -> evaluation -> push to a fake Hub -> a gallery index served by app.py
and searched through gradio_client. Killed once in extraction and once in training, then rerun: the
features, weights and metrics equal an uninterrupted run's. Also: prepare's errors, GloVe 840B from a
Hub cache in the published repo's layout.

The dataset is a local folder of parquet files exactly as ``datasets`` writes and the Hub serves them
(``data/test-00000-of-00001.parquet``, an ``image`` column of the ``datasets.Image`` feature, the
columns of ``nlphuji/flickr30k``), read by the same ``load_dataset(..., streaming=True)`` call as a
Hub repo. Images are small and the BUTD weights random (as in tests/test_bottom_up.py).
"""

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import SpaceCard
from huggingface_hub import constants as hub_constants
from PIL import Image
from skimage import data
from test_bottom_up import SMALL, weights  # noqa: F401 (fixture)
from conftest import app_process

import training.push as push
from adapt import build_vocab
from adapt.encoders import GLOVE_840B_REPO, WORD_VECTOR_SOURCES
from training import prepare, recipe

ROOT = Path(__file__).resolve().parents[1]
# name -> (skimage photo, Karpathy split, what it shows)
PHOTOS = {
    "astronaut.jpg": ("astronaut", "train", "a woman in a space suit"),
    "coffee.jpg": ("coffee", "train", "a cup of coffee on a saucer"),
    "chelsea.jpg": ("chelsea", "train", "a cat with a striped face"),
    "rocket.jpg": ("rocket", "train", "a rocket on the launch pad"),
    "camera.jpg": ("camera", "train", "a man with a camera"),
    "coins.jpg": ("coins", "train", "old coins on a table"),
    "horse.jpg": ("horse", "val", "a black horse"),
    "hubble.jpg": ("hubble_deep_field", "val", "galaxies in deep space"),
    "moon.jpg": ("moon", "val", "the surface of the moon"),
    "page.jpg": ("page", "test", "a page of printed text"),
    "clock.jpg": ("clock", "test", "a clock on a wall"),
    "text.jpg": ("text", "test", "letters painted on a wall"),
}
SIZES = {"train": 6, "dev": 3, "test": 3}


def jpeg(photo: str) -> bytes:
    image = Image.fromarray(getattr(data, photo)()).convert("RGB")
    image.thumbnail((120, 120))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """The dataset as nlphuji/flickr30k lays it out: one Hub split, the Karpathy split as a column."""
    folder = tmp_path_factory.mktemp("flickr30k-hub")
    rows = {"image": [], "caption": [], "sentids": [], "split": [], "img_id": [], "filename": []}
    for number, (name, (photo, split, shows)) in enumerate(PHOTOS.items()):
        rows["image"].append({"bytes": jpeg(photo), "path": name})
        rows["caption"].append([f"{shows} number {n}" for n in range(5)])
        rows["sentids"].append([str(5 * number + n) for n in range(5)])
        rows["split"].append(split)
        rows["img_id"].append(str(number))
        rows["filename"].append(name)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                  "sentids": datasets.List(datasets.Value("string")),
                                  "split": datasets.Value("string"), "img_id": datasets.Value("string"),
                                  "filename": datasets.Value("string")})
    (folder / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    return folder


def arguments(hub_folder: Path, weights_file: Path, out: Path) -> list[str]:
    options = {**SMALL, "weights": weights_file, "num_regions": 4, "num_proposals": 6}
    overrides = {"model.latent_size": 32, "model.word_dim": 16, "train.batch_size": 4, "train.epochs": 4,
                 "train.val_every": 2, "train.progress": "false", "train.device": "cpu", "train.workers": 0,
                 "optim.warmup_iterations": 2, "optim.decay_at": "[100]", "data.val_max_images": "null"}
    return ["flickr30k", "--repo-id", str(hub_folder), "--any-sizes", "--out", str(out), "--quiet",
            "--word-vectors", "glove-6b-50d", "--batch-size", "2",
            *[f"--extractor-option={k}={v}" for k, v in options.items()],
            *[f"--override={k}={v}" for k, v in overrides.items()]]


def run_until(args: list[str], ready, what: str) -> None:
    """Run the recipe in a subprocess and SIGKILL it as soon as ``ready()``."""
    process = subprocess.Popen([sys.executable, "-m", "training.recipe", *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"ended before {what}: {process.stderr.read()}"


def progress(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class FakeApi:
    """The Hub's upload API, keeping what was uploaded (as tests/test_push.py)."""

    uploads: dict[str, dict[str, bytes]] = {}

    def __init__(self, token):
        assert token == "hf_test"

    def create_repo(self, repo_id, **kwargs):
        FakeApi.uploads.setdefault(repo_id, {})

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        FakeApi.uploads[repo_id] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture(scope="module")
def runs(hub_folder, weights, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted run, and a run killed in extraction, killed in training, then finished with a push."""
    reference = tmp_path_factory.mktemp("reference")
    assert recipe.main(arguments(hub_folder, weights, reference)) == 0

    resumed = tmp_path_factory.mktemp("resumed")
    args = arguments(hub_folder, weights, resumed)
    train_progress = resumed / "features" / "train_progress.json"
    run_until(args, lambda: 0 < progress(train_progress).get("inputs_done", 0) < SIZES["train"], "extraction")
    assert not (resumed / "stages" / "extract.json").exists()
    state = resumed / "t2i" / "training_state" / "state.json"
    run_until(args, lambda: progress(state).get("progress", {}).get("iteration", 0) > 0, "training")
    assert not (resumed / "stages" / "train-t2i.json").exists()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(push, "HfApi", FakeApi)
        patch.setenv("HF_TOKEN", "hf_test")
        assert recipe.main([*args, "--push", "someone/adapt-tiny"]) == 0
    return reference, resumed


def test_a_killed_and_rerun_recipe_gives_the_uninterrupted_results(runs):
    reference, resumed = runs
    for split, n in SIZES.items():
        for name in ("ims", "boxes"):
            expected = np.load(reference / "features" / f"{split}_{name}.npy")
            assert expected.shape[0] == n
            np.testing.assert_array_equal(np.load(resumed / "features" / f"{split}_{name}.npy"), expected)
        assert (resumed / "features" / f"{split}_caps.txt").read_text() == \
            (reference / "features" / f"{split}_caps.txt").read_text()
    for head in ("t2i", "i2t"):
        assert (resumed / head / "best" / "model.safetensors").read_bytes() == \
            (reference / head / "best" / "model.safetensors").read_bytes()
    for name in ("t2i", "i2t", "ensemble"):
        report = json.loads((resumed / "eval" / f"{name}.json").read_text())
        assert report["protocols"] == json.loads((reference / "eval" / f"{name}.json").read_text())["protocols"]
        assert report["n_images"] == SIZES["test"]
    table = (resumed / "eval" / "table.md").read_text()
    assert "t2i, 3 images" in table and "ensemble, 3 images" in table and "76.4" in table


def test_the_checkpoints_are_pushed_with_their_cards(runs):
    _, resumed = runs
    for head in ("t2i", "i2t"):
        files = FakeApi.uploads[f"someone/adapt-tiny-{head}"]
        assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
        card = files["README.md"].decode()
        assert "| 3 images |" in card and "flickr30k-hub" in card
        assert json.loads((resumed / "stages" / f"push-{head}.json").read_text())["repo_id"].endswith(head)


def test_the_space_readme_asks_for_a_gpu_and_names_the_pushed_model(runs):
    _, resumed = runs
    card = SpaceCard.load(resumed / "space" / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.get("suggested_hardware") == "t4-small"  # bottom-up features need a GPU
    assert card.data.models == ["someone/adapt-tiny-t2i"]
    assert "ADAPT_CHECKPOINT=someone/adapt-tiny-t2i" in card.text and "ADAPT_GALLERY=index" in card.text


def test_the_app_serves_the_test_split_index(runs, tmp_path):
    _, resumed = runs
    assert json.loads((resumed / "stages" / "index.json").read_text())["images"] == SIZES["test"]
    env = {"ADAPT_CHECKPOINT": str(resumed / "t2i" / "best"), "ADAPT_GALLERY": str(resumed / "index"),
           "ADAPT_CACHE_DIR": str(tmp_path / "cache")}
    with app_process(env) as client:
        hits, status, drawing, shown = client.predict("a clock on a wall", 3, api_name="/search_gallery")
    assert status.startswith(f"Searched **{SIZES['test']} images**")
    assert len(hits) == 3 and Path(drawing).is_file()
    assert any(shown.startswith(f"1. {name} (") for name, (_, split, _) in PHOTOS.items() if split == "test")


def test_prepare_names_a_missing_column_and_wrong_split_sizes(hub_folder, tmp_path, capsys):
    base = ["flickr30k", "--repo-id", str(hub_folder), "--out", str(tmp_path / "data")]
    assert prepare.main(base) == 2
    assert "the dataset has train 6, dev 3, test 3 images per split, but the Karpathy split of flickr30k has " \
           "train 29,000, dev 1,014, test 1,000" in capsys.readouterr().err
    assert prepare.main([*base, "--any-sizes", "--column", "caption=sentences"]) == 2
    assert "no column 'sentences'" in capsys.readouterr().err
    assert prepare.main([*base, "--any-sizes"]) == 0
    records = prepare.prepared_records(tmp_path / "data")
    assert [r.image for r in records] == list(PHOTOS)
    assert records[0].captions[0] == "a woman in a space suit number 0"
    assert {r.split for r in records} == set(SIZES)


def test_glove_840b_loads_from_a_hub_cache_in_the_published_layout(tmp_path, monkeypatch):
    """sentence-transformers' layout: the cased vocabulary in whitespacetokenizer_config.json, the
    vectors as `emb_layer.weight` in a pickled state dict, both under 0_WordEmbeddings/."""
    revision = "7e0d4246e8632624e172145e00b2a4e155aa34bf"
    repo = tmp_path / f"models--{GLOVE_840B_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision / "0_WordEmbeddings"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    words = [",", "The", "the", "cat", "Cat", "sofa"]
    vectors = torch.randn(len(words), 300, generator=torch.Generator().manual_seed(0))
    (snapshot / "whitespacetokenizer_config.json").write_text(
        json.dumps({"vocab": words, "stop_words": [], "do_lower_case": False}))
    torch.save({"emb_layer.weight": vectors}, snapshot / "pytorch_model.bin")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    vocab = build_vocab(["The cat , the sofa", "a dog"])
    table = WORD_VECTOR_SOURCES["glove-840b-300d"].load(vocab)
    assert table.shape == (len(vocab), 300)
    for word, row in (("the", 2), ("cat", 3), ("sofa", 5), (",", 0)):
        assert torch.equal(table[vocab.index(word)], vectors[row])
    for word in ("a", "dog", "<pad>"):
        assert not table[vocab.index(word)].any()
