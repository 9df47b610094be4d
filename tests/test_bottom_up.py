"""The bottom-up-attention backend: the published checkpoint's exact layout, weights from a local file
and from a Hub cache, real photos, the selection rules, clear errors for bad files, the ``data.extractor``
key, and the whole path photos -> training.extract -> training.train -> push --dry-run -> Retriever and app.

The published weights are not available offline: every test runs on a file the test writes, in the
checkpoint's layout (every key and shape) with random values. Inputs are small (96-px short side
instead of 600) and proposals few, because each proposal costs a ResNet res5 pass on 2 CPU cores.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from gradio_client import Client, handle_file
from huggingface_hub import constants as hub_constants
from PIL import Image
from skimage import data

import app
import app_logic
from adapt import AdaptModel, ConfigError
from adapt.pipeline import Retriever
from adapt.regions import (
    BACKENDS,
    FILL_LABEL,
    BottomUpAttentionExtractor,
    ExtractorError,
    build_extractor,
    check_extractor,
)
from adapt.regions.bottom_up import per_class_confidence, select_regions
from adapt.regions.bottom_up_net import PUBLISHED_FILE, PUBLISHED_REPO, BottomUpAttentionNet
from training import push
from training.config import load_config
from training.data import DatasetError, load_split, resolve_extractor
from training.extract import ExtractError, ImageRecord, extract_dataset, read_records
from training.extract import main as extract_main
from training.train import main as train_main

SMALL = {"short_side": 96, "max_side": 144, "device": "cpu"}  # the published input is 600 / 1000 px
REVISION = "0123456789abcdef0123456789abcdef01234567"
OPENCV_PHOTO = Path("/usr/share/doc/opencv-doc/examples/data/apple.jpg")

# ---- the published checkpoint, stated from its config (unc-nlp/frcnn-vg-finetuned) -------------
# ResNet-101 C4: res2-res4 in the backbone, res5 (3 blocks) in the box head; stem 64 channels; the
# stage widths double from res2's bottleneck 64 / output 256. RPN on res4 (1024 channels) with a
# 512-channel hidden conv and 12 anchors per cell (sizes 64-512, ratios 0.5 / 1 / 2). Box head:
# 1600 Visual Genome classes + background, class-specific box regression (no background box),
# 400 attributes + "no attribute", fed by a 256-d class embedding through a 512-d layer.
RESNET_BLOCKS = {"backbone.res2": 3, "backbone.res3": 4, "backbone.res4": 23, "roi_heads.res5": 3}
NUM_CLASSES, NUM_ATTRIBUTES, ANCHORS_PER_CELL, RPN_HIDDEN = 1600, 400, 12, 512
PUBLISHED_VALUES = 65_545_214  # numbers in the state dict: 262 MB of float32, the published file's size


def published_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the published state dict and its shape, from the numbers above."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_norm(prefix: str, c_in: int, c_out: int, kernel: int) -> None:
        shapes[f"{prefix}.weight"] = (c_out, c_in, kernel, kernel)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{name}"] = (c_out,)

    conv_norm("backbone.stem.conv1", 3, 64, 7)
    c_in, width, c_out = 64, 64, 256
    for stage, blocks in RESNET_BLOCKS.items():
        for block in range(blocks):
            prefix = f"{stage}.{block}"
            if block == 0:
                conv_norm(f"{prefix}.shortcut", c_in, c_out, 1)
            conv_norm(f"{prefix}.conv1", c_in if block == 0 else c_out, width, 1)
            conv_norm(f"{prefix}.conv2", width, width, 3)
            conv_norm(f"{prefix}.conv3", width, c_out, 1)
        c_in, width, c_out = c_out, width * 2, c_out * 2
    rpn = "proposal_generator"
    shapes[f"{rpn}.anchor_generator.cell_anchors.0"] = (ANCHORS_PER_CELL, 4)
    for name, c_from, c_to, kernel in (("conv", 1024, RPN_HIDDEN, 3), ("objectness_logits", RPN_HIDDEN, ANCHORS_PER_CELL, 1),
                                       ("anchor_deltas", RPN_HIDDEN, ANCHORS_PER_CELL * 4, 1)):
        shapes[f"{rpn}.rpn_head.{name}.weight"] = (c_to, c_from, kernel, kernel)
        shapes[f"{rpn}.rpn_head.{name}.bias"] = (c_to,)
    head = "roi_heads.box_predictor"
    for name, c_from, c_to in (("cls_score", 2048, NUM_CLASSES + 1), ("bbox_pred", 2048, NUM_CLASSES * 4),
                               ("fc_attr", 2048 + 256, 512), ("attr_score", 512, NUM_ATTRIBUTES + 1)):
        shapes[f"{head}.{name}.weight"] = (c_to, c_from)
        shapes[f"{head}.{name}.bias"] = (c_to,)
    shapes[f"{head}.cls_embedding.weight"] = (NUM_CLASSES + 1, 256)
    return shapes


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights file in the published layout with seeded random values (BatchNorm statistics too)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    state = BottomUpAttentionNet().state_dict()
    for key, value in state.items():
        if key.endswith("norm.running_var") or key.endswith("norm.weight"):
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
        elif key.endswith("norm.running_mean") or key.endswith("norm.bias"):
            value.copy_(0.1 * torch.randn(value.shape, generator=generator))
    path = tmp_path_factory.mktemp("weights") / PUBLISHED_FILE
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, weights) -> Path:
    """A Hugging Face Hub cache holding the published repo's file (the weights above), laid out as
    ``hf_hub_download`` leaves it: the blob, a snapshot symlink to it, the ref of ``main``."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / f"models--{PUBLISHED_REPO.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / REVISION).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    blob = repo / "blobs" / "f00d"
    os.link(weights, blob)  # same bytes, no copy
    (repo / "snapshots" / REVISION / PUBLISHED_FILE).symlink_to(Path("..", "..", "blobs", blob.name))
    return cache


@pytest.fixture(scope="module")
def extractor(weights) -> BottomUpAttentionExtractor:
    """36 regions out of 40 proposals per image."""
    return BottomUpAttentionExtractor(weights, num_proposals=40, **SMALL)


def photos() -> list[np.ndarray | Path]:
    return [data.astronaut(), OPENCV_PHOTO if OPENCV_PHOTO.is_file() else data.coffee()]


# ---- layout and weights ------------------------------------------------------------------------


def test_the_state_dict_has_every_key_and_shape_of_the_published_checkpoint(weights):
    state = torch.load(weights, map_location="cpu", weights_only=True)
    expected = published_shapes()
    assert sorted(state) == sorted(expected)
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    assert sum(int(np.prod(shape)) for shape in expected.values()) == PUBLISHED_VALUES
    assert sum(value.numel() for value in state.values()) == PUBLISHED_VALUES


def test_weights_load_from_a_local_file_and_from_the_hub_cache(weights, hub_cache, extractor, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hub = BottomUpAttentionExtractor(cache_dir=hub_cache, local_files_only=True, num_proposals=40, **SMALL)
    assert from_hub.identity["weights_source"] == {"repo_id": PUBLISHED_REPO, "filename": PUBLISHED_FILE,
                                                   "revision": None}
    assert from_hub.identity["weights"] == extractor.identity["weights"]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for loaded in (from_hub, extractor):
        assert all(torch.equal(loaded.model.state_dict()[key], value) for key, value in state.items())
    # The Hub identity a checkpoint records is rebuilt from a local copy of the same file.
    assert build_extractor(from_hub.identity, weights=weights).identity["weights"] == from_hub.identity["weights"]
    with pytest.raises(ExtractorError, match="someone/absent"):
        BottomUpAttentionExtractor(repo_id="someone/absent", cache_dir=hub_cache, local_files_only=True)


def test_bad_weight_files_are_refused_naming_what_is_wrong(tmp_path, weights):
    with pytest.raises(ExtractorError, match="no such weights file"):
        BottomUpAttentionExtractor(tmp_path / "absent.bin")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(weights.read_bytes()[: 1 << 20])
    with pytest.raises(ExtractorError, match="truncated.bin: not a readable torch state dict"):
        BottomUpAttentionExtractor(truncated)
    pickled_object = tmp_path / "object.bin"
    torch.save({"model": Path("x")}, pickled_object)  # weights_only refuses to unpickle it
    with pytest.raises(ExtractorError, match="not a readable torch state dict"):
        BottomUpAttentionExtractor(pickled_object)
    coco = tmp_path / "coco.bin"  # a head for 80 COCO classes, and a key the model does not have
    torch.save({"roi_heads.box_predictor.cls_score.bias": torch.zeros(81), "roi_heads.mask_head.weight": torch.zeros(1)},
               coco)
    with pytest.raises(ExtractorError) as error:
        BottomUpAttentionExtractor(coco)
    message = str(error.value)
    assert "wrong shapes: roi_heads.box_predictor.cls_score.bias is (81,) in the file, (1601,) in the model" in message
    assert "unexpected keys: roi_heads.mask_head.weight" in message
    assert "missing keys: backbone.res2.0.conv1.norm.bias" in message


# ---- regions on real photos --------------------------------------------------------------------


def test_real_photos_give_36_regions_of_2048_inside_the_image_deterministically(extractor):
    images = photos()
    first = extractor.extract_batch(images)
    for image, regions in zip(images, first, strict=True):
        width, height = Image.open(image).size if isinstance(image, Path) else image.shape[1::-1]
        assert regions.image_size == (width, height)
        assert regions.features.shape == (36, 2048) and regions.features.dtype == np.float32
        assert np.isfinite(regions.features).all() and regions.features.std() > 0
        assert regions.boxes.shape == (36, 4)
        assert (regions.boxes >= 0).all() and (regions.boxes[:, [0, 2]] <= width).all()
        assert (regions.boxes[:, [1, 3]] <= height).all()
        assert (regions.boxes[:, 2:] > regions.boxes[:, :2]).all()
        assert not regions.is_fill.any() and (np.diff(regions.scores) <= 0).all()
        assert all(label.isdigit() and 0 <= int(label) < NUM_CLASSES for label in regions.labels)
    again = extractor.extract(images[0])
    assert np.array_equal(again.features, first[0].features) and np.array_equal(again.boxes, first[0].boxes)
    identity = extractor.identity
    assert identity["name"] == "bottom-up-attention" and "bottom-up attention" in identity["features"]
    assert (identity["num_regions"], identity["feature_dim"]) == (36, 2048)


def test_per_class_nms_then_the_most_confident():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
    # Class 0 keeps box 0 over the overlapping box 1; class 1 keeps box 1 (box 0 overlaps it and scores less).
    probs = torch.tensor([[0.6, 0.1], [0.5, 0.3], [0.1, 0.7]])
    confidence = per_class_confidence(boxes, probs, nms_iou=0.3)
    assert confidence.tolist() == pytest.approx([0.6, 0.3, 0.7])
    confidence = torch.tensor([0.6, 0.3, 0.7, 0.1, 0.05])
    assert select_regions(confidence, 2, 2, 0.2).tolist() == [2, 0]  # a fixed count: the most confident
    assert select_regions(confidence, 1, 4, 0.2).tolist() == [2, 0, 1]  # adaptive: those at >= 0.2
    assert select_regions(confidence, 4, 5, 0.2).tolist() == [2, 0, 1, 3]  # ... but at least min_count
    assert select_regions(confidence, 1, 2, 0.2).tolist() == [2, 0]  # ... and at most max_count
    assert select_regions(confidence, 9, 9, 0.2).tolist() == [2, 0, 1, 3, 4]  # fewer boxes than asked


def test_per_class_nms_of_all_classes_at_once_equals_one_torchvision_nms_per_class():
    from benchmarks.extract_speed import nms_per_class_loop

    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(80, 2, generator=generator) * 300
    boxes = torch.cat([corners, corners + torch.rand(80, 2, generator=generator) * 200 + 1], dim=1)
    probs = (3 * torch.randn(80, NUM_CLASSES + 1, generator=generator)).softmax(dim=1)[:, :NUM_CLASSES]
    for scores in (probs, probs.round(decimals=3)):  # the rounded scores have ties
        assert torch.equal(per_class_confidence(boxes, scores, 0.3), nms_per_class_loop(boxes, scores, 0.3))


def test_adaptive_count_whole_image_geometry_and_vocabulary_labels(tmp_path, weights):
    objects, attributes = tmp_path / "objects_vocab.txt", tmp_path / "attributes_vocab.txt"
    objects.write_text("".join(f"thing{i},synonym\n" for i in range(NUM_CLASSES)))
    attributes.write_text("".join(f"colour{i}\n" for i in range(NUM_ATTRIBUTES)))
    adaptive = BottomUpAttentionExtractor(weights, num_regions=6, min_regions=2, score_threshold=0.5, whole_image=True,
                                          with_geometry=True, num_proposals=12, objects_vocab=objects,
                                          attributes_vocab=attributes, **SMALL)
    predictor = adaptive.model.roi_heads.box_predictor
    predictor.cls_score.bias[5] += 30.0  # every box becomes a confident "thing5" ...
    predictor.attr_score.bias[7] += 30.0  # ... that is "colour7"
    regions = adaptive.extract(data.coffee())
    height, width = data.coffee().shape[:2]
    assert 2 <= len(regions.labels) <= 6 and regions.features.shape[1] == 2048 + 5
    assert regions.labels[0] == FILL_LABEL and regions.is_fill[0] and not regions.is_fill[1:].any()
    assert regions.boxes[0].tolist() == pytest.approx([0, 0, width, height])
    assert set(regions.labels[1:]) == {"colour7 thing5"} and (regions.scores[1:] > 0.5).all()
    assert adaptive.regions_per_image == (2, 6)
    identity = adaptive.identity
    assert identity["selection"]["min_regions"] == 2 and identity["selection"]["whole_image"]
    assert build_extractor(identity).identity == identity
    with pytest.raises(ExtractError, match="2 to 6 regions"):
        extract_dataset([ImageRecord("x.jpg", "train", ("a cat",))], tmp_path, tmp_path / "out", adaptive)
    with pytest.raises(ValueError, match="Visual Genome"):
        BottomUpAttentionExtractor(weights, with_labels=True)
    with pytest.raises(ValueError, match="with_scene is not supported"):
        BottomUpAttentionExtractor(weights, with_scene=True)


def test_extract_cli_takes_this_backends_weights(tmp_path, capsys):
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\nx.jpg,a cat\n")
    common = ["--images", str(tmp_path), "--captions", str(captions), "--out", str(tmp_path / "out"),
              "--extractor", "bottom-up-attention"]
    (tmp_path / "junk.bin").write_bytes(b"not weights")
    assert extract_main([*common, "--weights", str(tmp_path / "junk.bin")]) == 2
    assert "junk.bin: not a readable torch state dict" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        extract_main([*common, "--with-labels"])
    assert "Visual Genome" in capsys.readouterr().err


# ---- training on precomp files: the data.extractor key -----------------------------------------


def write_precomp(root: Path, region_dim: int, n_images: int = 2) -> Path:
    root.mkdir(parents=True)
    np.save(root / "train_ims.npy", np.zeros((n_images, 36, region_dim), dtype=np.float32))
    (root / "train_caps.txt").write_text("a man rides a horse\n" * 5 * n_images)
    return root


def test_data_extractor_names_the_extractor_of_plain_precomp_files(tmp_path, hub_cache, weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": str(tmp_path)}}))
    assert load_config(config, ["data.extractor=bottom-up-attention"]).data.extractor == "bottom-up-attention"
    with pytest.raises(ConfigError, match="no region extractor"):
        load_config(config, ["data.extractor=detectron2"])

    paper = load_split(write_precomp(tmp_path / "scan_precomp", 2048), "train")
    assert paper.extractor is None and resolve_extractor(paper, None) is None  # nothing said: origin unknown
    identity = resolve_extractor(paper, "bottom-up-attention")  # the published weights and settings
    assert identity["weights_source"]["repo_id"] == PUBLISHED_REPO
    assert check_extractor(identity, BottomUpAttentionExtractor(weights, device="cpu").identity) == []
    other = load_split(write_precomp(tmp_path / "other_precomp", 1024), "train")
    with pytest.raises(DatasetError, match="features are 36 x 1024 per image, but bottom-up-attention makes 36 x 2048"):
        resolve_extractor(other, "bottom-up-attention")
    (tmp_path / "scan_precomp" / "extractor.json").write_text('{"name": "ssd-mobilenet-v2+efficientnet-lite0"}')
    with pytest.raises(DatasetError, match="drop data.extractor"):
        resolve_extractor(load_split(tmp_path / "scan_precomp", "train"), "bottom-up-attention")
    assert "bottom-up-attention" in BACKENDS


# ---- end to end --------------------------------------------------------------------------------

CAPTIONS = {
    "astronaut": "a woman in a space suit smiling", "coffee": "a cup of coffee on a saucer",
    "chelsea": "a cat with a striped face", "rocket": "a rocket on the launch pad",
    "camera": "a man with a camera on a tripod", "coins": "old coins on a dark table",
}


def test_photos_to_a_served_checkpoint(tmp_path, weights):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["image,caption,split"]
    for index, (name, caption) in enumerate(CAPTIONS.items()):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(images / f"{name}.jpg", quality=90)
        rows += [f"{name}.jpg,{caption} {n},{'train' if index < 4 else 'dev'}" for n in range(5)]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    small = BottomUpAttentionExtractor(weights, num_regions=4, num_proposals=6, **SMALL)
    extract_dataset(read_records(tmp_path / "captions.csv"), images, tmp_path / "precomp", small, show_progress=False)
    assert np.load(tmp_path / "precomp" / "train_ims.npy").shape == (4, 4, 2048)

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"path": str(tmp_path / "precomp"), "name": "six photos", "val_max_images": None},
        "model": {"latent_size": 32, "word_vectors": "random", "word_dim": 16, "similarity": "t2i"},
        "optim": {"warmup_iterations": 2, "decay_at": [100]},
        "train": {"out_dir": str(tmp_path / "run"), "batch_size": 4, "max_iterations": 4, "val_every": 2,
                  "progress": False, "device": "cpu"},
    }))
    assert train_main(["--config", str(config)]) == 0
    assert push.main([str(tmp_path / "run" / "best"), "--repo-id", "someone/adapt-bua", "--dry-run",
                      str(tmp_path / "upload")]) == 0
    assert AdaptModel.from_pretrained(str(tmp_path / "upload")).config.extractor == small.identity

    retriever = Retriever.from_pretrained(tmp_path / "upload", device="cpu")
    assert retriever.extractor.identity == small.identity  # rebuilt from the checkpoint alone
    captions = list(CAPTIONS.values())[:3]
    ranked = retriever.rank_captions(images / "coffee.jpg", captions)
    assert sorted(ranked.captions) == sorted(captions) and (np.diff(ranked.scores) <= 0).all()

    demo = app.build_demo(app.Demo(retriever), str(tmp_path / "upload"))
    _, url, _ = demo.launch(prevent_thread_lock=True, max_file_size=app.MAX_FILE_SIZE, server_port=None)
    try:
        table, *_ = Client(url, verbose=False).predict(
            handle_file(str(images / "coffee.jpg")), "\n".join(captions), next(iter(app_logic.SCORING)), False,
            api_name="/rank_captions")
    finally:
        demo.close()
    assert [row[1] for row in table["data"]] == ranked.captions
