"""Publishing: the dry-run folder is what a real push uploads, and it loads back with the same scores."""

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, SpaceCard, metadata_load

import training.push as push
from adapt import AdaptConfig, AdaptModel, build_vocab
from training.card import model_card, space_card, training_card
from training.config import TrainConfig
from training.data import load_split
from training.state import Progress

CAPTIONS = ["a dog on a sofa", "two cats", "a red car in the street", "a boat", "children play football"]
EXTRACTOR = {"detector": "ssd-mobilenet-v2-coco", "backbone": "efficientnet-lite0", "regions": 5, "box_features": True}
REPORT = {"checkpoints": ["ckpt"], "data": "data/f30k_precomp", "split": "test", "n_images": 1000,
          "n_captions": 5000, "protocols": {"1000 images": {"metrics": {
              **{f"{d}_{m}": 10.0 for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")},
              "rsum": 432.1}}}}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    config = AdaptConfig(region_dim=12, latent_size=16, vocab=build_vocab(CAPTIONS), word_vectors="random",
                         word_dim=8, extractor=EXTRACTOR,
                         card={"data": {"name": "Flickr30k", "train_images": 29000},
                               "validation": {"split": "dev", "images": 1000, "captions": 5000, "iteration": 500,
                                              "metrics": {**REPORT["protocols"]["1000 images"]["metrics"],
                                                          "rsum": 321.0}}})
    model = AdaptModel(config)
    with torch.no_grad():
        model.similarity.heads["t2i"].norm.running_mean.uniform_(-0.2, 0.2)
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def scores(model: AdaptModel) -> torch.Tensor:
    features = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    return model.score(features, CAPTIONS).scores


def test_dry_run_folder_loads_and_scores_the_same(tmp_path, checkpoint, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(REPORT))
    out = tmp_path / "upload"
    assert push.main([str(checkpoint), "--repo-id", "someone/adapt-f30k-t2i", "--dry-run", str(out), "--metrics",
                      str(report), "--license", "apache-2.0", "--dataset", "nlphuji/flickr30k"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    original, pushed = AdaptModel.from_pretrained(str(checkpoint)), AdaptModel.from_pretrained(str(out))
    assert torch.equal(scores(original), scores(pushed))
    assert pushed.config.extractor == EXTRACTOR
    assert pushed.config.card["test"]["protocols"]["1000 images"]["rsum"] == 432.1

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "adapt" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["nlphuji/flickr30k"] and "image-text-retrieval" in card.data.tags
    assert card.data.metrics == ["recall"]
    text = card.text
    assert '"detector": "ssd-mobilenet-v2-coco"' in text  # extractor identity
    assert "| validation |" in text and "321.0" in text and "| 1000 images |" in text and "432.1" in text
    assert 'AdaptModel.from_pretrained("someone/adapt-f30k-t2i")' in text
    assert "## Intended use" in text and "## Licence" in text


def test_real_push_uploads_exactly_the_dry_run_folder(tmp_path, checkpoint, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token):
            uploaded["token"] = token

        def create_repo(self, repo_id, **kwargs):
            uploaded["created"] = (repo_id, kwargs["private"])

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            # The staging folder is temporary: read it while it exists.
            uploaded["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(push, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert push.main([str(checkpoint), "--repo-id", "someone/x", "--private"]) == 0
    push.main([str(checkpoint), "--repo-id", "someone/x", "--dry-run", str(tmp_path / "dry")])
    assert uploaded["token"] == "hf_test" and uploaded["created"] == ("someone/x", True)
    assert uploaded["files"] == {p.name: p.read_bytes() for p in (tmp_path / "dry").iterdir()}


def test_push_errors_are_clear(tmp_path, checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        push.main([str(checkpoint), "--repo-id", "someone/x"])
    assert "set HF_TOKEN" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        push.main([str(tmp_path / "nope"), "--repo-id", "someone/x", "--dry-run", str(tmp_path / "out")])
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        push.main([str(checkpoint), "--repo-id", "someone/x", "--dry-run", str(tmp_path / "full")])
    assert "is not empty" in capsys.readouterr().err


def test_card_without_training_metadata():
    config = AdaptConfig(region_dim=8, latent_size=8, vocab=build_vocab(CAPTIONS), word_vectors="random")
    text = model_card(config)
    assert text.startswith("---\nlibrary_name: adapt\n") and "No metrics recorded." in text
    assert "features of unknown origin" in text


@pytest.mark.parametrize("name, terms", [
    ("Flickr30k (SCAN bottom-up-attention precomp features)", "Flickr30k: non-commercial research use"),
    ("adapt scenes (Debian tuxpaint-stamps photo cut-outs; GPL-2)", "adapt scenes (Debian tuxpaint-stamps"),
])
def test_card_names_the_training_data_and_its_terms(name, terms):
    config = AdaptConfig(region_dim=8, latent_size=8, vocab=build_vocab(CAPTIONS), word_vectors="random",
                         card={"data": {"name": name}})
    text = model_card(config)
    limitations = text.split("## Intended use and limitations")[1].split("## Licence")[0]
    licence = text.split("## Licence")[1].split("## Citation")[0]
    assert f"of its training data, {name}, and" in limitations and f"own terms — {terms}" in licence
    assert "))" not in limitations + licence  # no "(name (detail))" doubling
    assert ("Flickr30k" in text) == ("Flickr30k" in name)


@pytest.mark.parametrize("cwd", ["data", "elsewhere"])  # started where the data lies, or outside it
def test_card_of_a_run_on_an_absolute_data_path_names_no_local_path(tmp_path, monkeypatch, cwd):
    data = tmp_path / "data" / "f30k_precomp"
    data.mkdir(parents=True)
    for split, n in (("train", 4), ("dev", 2)):
        np.save(data / f"{split}_ims.npy", np.zeros((n, 3, 12), dtype=np.float32))
        (data / f"{split}_caps.txt").write_text("\n".join(CAPTIONS * n) + "\n")
    (tmp_path / cwd).mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path / cwd)
    run = TrainConfig.from_dict({"data": {"path": str(data), "name": "Flickr30k"}})
    record = training_card(run, load_split(str(data), "train", 5), load_split(str(data), "dev", 5),
                           Progress(iteration=7), REPORT["protocols"]["1000 images"]["metrics"])
    config = AdaptConfig(region_dim=12, latent_size=16, vocab=build_vocab(CAPTIONS), word_vectors="random",
                         card=record)
    text = json.dumps(record) + model_card(config)
    assert record["data"]["path"] == "f30k_precomp" and "(`f30k_precomp`, split `train`)" in text
    for local in (str(tmp_path), tempfile.gettempdir(), str(Path.home())):
        assert local.rstrip("/") and local not in text


def test_pushed_card_lists_the_datasets_and_test_metrics_in_the_hub_metadata(tmp_path, checkpoint):
    report = {"split": "test", "protocols": {
        name: {"metrics": {**{f"{d}_{m}": value + i for i, (d, m) in enumerate(
            (d, m) for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr"))}, "rsum": 6 * value}}
        for name, value in (("5 folds of 200 images", 60.0), ("1000 images", 40.0))}}
    out = push.stage(checkpoint, tmp_path / "upload", repo_id="someone/adapt-f30k", datasets=["nlphuji/flickr30k"],
                     test_report=report)

    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["nlphuji/flickr30k"] and card.data.model_name == "adapt-f30k"
    results = {(r.metric_config, r.metric_type): r for r in card.data.eval_results}
    assert len(results) == 2 * 7
    full = results[("1000 images", "t2i_r10")]
    assert (full.task_type, full.dataset_type, full.dataset_name, full.dataset_split) == (
        "image-text-retrieval", "nlphuji/flickr30k", "Flickr30k", "test")  # the name from the run's record
    assert full.metric_value == 47.0 and full.metric_name == "Text→Image R@10 (1000 images)"
    assert results[("5 folds of 200 images", "i2t_r1")].metric_value == 60.0
    assert results[("5 folds of 200 images", "rsum")].metric_value == 360.0

    (index,) = metadata_load(out / "README.md")["model-index"]  # the raw YAML in the Hub's layout
    (entry,) = index["results"]
    assert entry["dataset"] == {"name": "Flickr30k", "type": "nlphuji/flickr30k", "split": "test"}
    assert {m["type"] for m in entry["metrics"]} == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                                                     "rsum"}


def test_card_without_test_report_has_no_model_index(checkpoint, tmp_path):
    out = push.stage(checkpoint, tmp_path / "upload", repo_id="someone/x", datasets=["nlphuji/flickr30k"])
    assert "model-index" not in metadata_load(out / "README.md")


def test_a_space_asks_for_a_gpu_only_for_bottom_up_features(checkpoint, tmp_path):
    config = AdaptModel.from_pretrained(checkpoint).config
    for extractor, hardware in (({"name": "ssd-mobilenet-v2"}, None), ({"name": "bottom-up-attention"}, "t4-small")):
        card = space_card(dataclasses.replace(config, extractor=extractor), str(checkpoint), gallery=str(tmp_path / "index"))
        card.save(tmp_path / "README.md")
        loaded = SpaceCard.load(tmp_path / "README.md")
        assert loaded.data.get("suggested_hardware") == hardware and loaded.data.app_file == "app.py"
        assert loaded.data.models is None and str(tmp_path) not in loaded.content  # a local model: no absolute path
