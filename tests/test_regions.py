"""adapt.regions: detection on real photos, region features, fills, identity checks, both backends,
weights from a local file and a Hub cache, and robust image loading (every kind of bad input)."""

import json
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from torchvision.ops import box_iou

from adapt.regions import (
    DEFAULT_EXTRACTOR,
    FILL_LABEL,
    ExtractorError,
    ExtractorMismatchError,
    FasterRcnnExtractor,
    ImageError,
    Regions,
    SsdEfficientNetExtractor,
    build_extractor,
    check_extractor,
    comparable_identity,
    fill_boxes,
    load_image,
)
from adapt.regions.base import LABEL_DIM, SCENE_DIM
from checkpoints import DEFAULT_CHECKPOINT

# Hand-measured object boxes (x1, y1, x2, y2) in the scikit-image sample photos.
OBJECTS = {
    "chelsea": ("cat", (0, 0, 400, 300)),
    "coffee": ("cup", (172, 18, 410, 290)),
    "astronaut": ("person", (20, 15, 365, 512)),
}
# A cheap Faster R-CNN configuration for tests (random weights: boxes are meaningless anyway).
SMALL_FRCNN = {"min_size": 224, "max_size": 320, "num_proposals": 100}
# The parameter whose value the weight-loading tests change.
PROBE = "roi_heads.box_predictor.cls_score.bias"


@pytest.fixture(scope="module")
def ssd():
    return SsdEfficientNetExtractor()


@pytest.fixture(scope="module")
def ssd_strict():
    """Only confident detections, so most of its 12 regions are fills; with box geometry."""
    return SsdEfficientNetExtractor(num_regions=12, score_threshold=0.5, with_geometry=True)


@pytest.fixture(scope="module")
def frcnn():
    """Random weights, small input and no score floor: up to 100 (meaningless) boxes per image."""
    return FasterRcnnExtractor(num_regions=8, score_threshold=0.0, **SMALL_FRCNN)


@pytest.fixture(scope="module")
def frcnn_weights(tmp_path_factory, frcnn):
    """A Faster R-CNN safetensors file differing from the random init in PROBE, stored the way a
    Hugging Face Hub cache stores a downloaded file."""
    cache = tmp_path_factory.mktemp("hf-cache")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--frcnn-coco"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    state = {k: v.clone() for k, v in frcnn.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state[PROBE] += 1.0
    path = repo / "snapshots" / revision / "model.safetensors"
    save_file(state, str(path))
    return cache, path, state


def photo(name: str) -> np.ndarray:
    return getattr(data, name)()


def check_regions(regions: Regions, k: int, dim: int, size: tuple[int, int]) -> None:
    width, height = size
    assert regions.image_size == size
    assert regions.boxes.shape == (k, 4) and regions.boxes.dtype == np.float32
    assert regions.features.shape == (k, dim) and regions.features.dtype == np.float32
    assert regions.scores.shape == (k,) and regions.is_fill.shape == (k,) and len(regions.labels) == k
    assert np.isfinite(regions.features).all()
    x1, y1, x2, y2 = regions.boxes.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
    assert (x2 >= x1).all() and (y2 >= y1).all()
    real = ~regions.is_fill
    assert (np.diff(regions.scores[real]) <= 0).all(), "real detections come first, by decreasing score"
    assert (regions.is_fill == (np.arange(k) >= real.sum())).all(), "fills come after the real boxes"
    assert (regions.scores[~real] == 0).all()
    assert all((label == FILL_LABEL) == fill for label, fill in zip(regions.labels, regions.is_fill, strict=True))


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_default_backend_finds_the_object(ssd, name):
    image = photo(name)
    regions = ssd.extract(image)
    check_regions(regions, 36, 1280, (image.shape[1], image.shape[0]))
    label, hand_box = OBJECTS[name]
    top = [i for i in range(5) if regions.labels[i] == label]
    assert top, f"no {label} among the top detections {regions.labels[:5]}"
    iou = box_iou(torch.tensor([hand_box], dtype=torch.float32), torch.from_numpy(regions.boxes[top])).max()
    assert iou > 0.6, f"{label} boxes {regions.boxes[top]} miss the object {hand_box} (IoU {iou:.2f})"


def test_features_are_deterministic_and_independent_of_input_kind(ssd, tmp_path):
    image = photo("chelsea")
    path = tmp_path / "chelsea.png"
    Image.fromarray(image).save(path)
    first = ssd.extract(image)
    for other in (ssd.extract(image), ssd.extract(path)):
        assert np.array_equal(first.features, other.features) and np.array_equal(first.boxes, other.boxes)
        assert first.labels == other.labels


def test_batch_matches_single_images(ssd):
    images = [photo("chelsea"), photo("coffee")]
    for single, batched in zip(map(ssd.extract, images), ssd.extract_batch(images), strict=True):
        assert np.array_equal(single.boxes, batched.boxes) and single.labels == batched.labels
        assert np.array_equal(single.features, batched.features)


def test_regions_differ_by_content(ssd):
    regions = ssd.extract(photo("coffee"))
    cup, table = regions.labels.index("cup"), regions.labels.index("dining table")
    cosine = regions.features[cup] @ regions.features[table] / (
        np.linalg.norm(regions.features[cup]) * np.linalg.norm(regions.features[table]))
    assert cosine < 0.95


def test_fill_boxes_whole_image_then_grids():
    expected = [[0, 0, 100, 50], [0, 0, 50, 25], [50, 0, 100, 25], [0, 25, 50, 50], [50, 25, 100, 50],
                [0, 0, 100 / 3, 50 / 3]]
    np.testing.assert_allclose(fill_boxes(6, 100, 50).numpy(), expected, rtol=1e-6)
    assert fill_boxes(0, 10, 10).shape == (0, 4)
    assert fill_boxes(36, 10, 10).shape == (36, 4)


def test_missing_detections_are_filled_and_marked(ssd_strict):
    image = photo("chelsea")
    regions = ssd_strict.extract(image)
    check_regions(regions, 12, 1285, (451, 300))
    assert regions.labels[0] == "cat" and regions.is_fill.tolist() == [False] + [True] * 11
    np.testing.assert_allclose(regions.boxes[1:], fill_boxes(11, 451, 300).numpy(), atol=1e-3)
    geometry = regions.features[:, 1280:]
    np.testing.assert_allclose(geometry[:, :4], regions.boxes / [451, 300, 451, 300], atol=1e-6)
    np.testing.assert_allclose(geometry[1, 4], 1.0, atol=1e-6)  # the whole-image fill
    np.testing.assert_allclose(geometry[2:6, 4], 0.25, atol=1e-6)  # the 2x2 grid


def test_identity_and_check(ssd):
    identity = ssd.identity
    assert json.loads(json.dumps(identity)) == identity
    assert identity["name"] == DEFAULT_EXTRACTOR and identity["num_regions"] == 36
    assert identity["feature_dim"] == 1280 and identity["with_geometry"] is False
    assert identity["preprocessing"]["backbone_short_side"] == 384
    assert check_extractor(identity, identity) == []
    moved = {**identity, "weights_source": {"path": "/elsewhere"}}
    assert check_extractor(moved, identity) == [], "where the weights were found is no part of the check"

    preprocessing = {**identity["preprocessing"], "backbone_short_side": 512}
    trained = {**identity, "num_regions": 20, "preprocessing": preprocessing}
    with pytest.raises(ExtractorMismatchError) as error:
        check_extractor(trained, identity)
    message = str(error.value)
    assert "num_regions: model has 20, extractor has 36" in message
    assert "preprocessing.backbone_short_side" in message and "recall" in message and "allow_mismatch" in message
    with pytest.raises(ExtractorMismatchError, match="unknown origin"):
        check_extractor(None, identity)
    with pytest.warns(UserWarning, match="mismatch"):
        assert len(check_extractor(trained, identity, allow_mismatch=True)) == 2


def test_descriptions_in_words_are_no_part_of_the_check_but_every_setting_is(ssd):
    identity = ssd.identity
    reworded = json.loads(json.dumps(identity))
    reworded["selection"]["fill"] = "the whole image, then grids of 2x2, 3x3, ..."
    reworded["preprocessing"]["resize"] = "bilinear (PIL)"
    reworded["preprocessing"]["backbone_normalisation"] = "(rgb - 127) / 128, rgb in 0-255"
    assert check_extractor(reworded, identity) == []
    assert "selection.fill" not in comparable_identity(identity)
    changed = [
        {**identity, "weights": "other-detector"},
        {**identity, "format": identity["format"] + 1},
        {**identity, "with_labels": True},
        {**identity, "with_scene": {"classifier": "efficientnet_lite3.tflite (int8)", "input": [280, 280]}},
        {**identity, "selection": {**identity["selection"], "nms_iou": 0.4}},
        {**identity, "selection": {**identity["selection"], "whole_image": True}},
        {**identity, "preprocessing": {**identity["preprocessing"], "detector_input": [320, 320]}},
    ]
    for trained in changed:
        with pytest.warns(UserWarning, match="region extractor mismatch"):
            assert len(check_extractor(trained, identity, allow_mismatch=True)) == 1


def test_with_scene_every_region_carries_the_whole_photos_imagenet_probabilities():
    extractor = SsdEfficientNetExtractor(num_regions=6, with_labels=True, with_scene=True, with_geometry=True)
    assert extractor.feature_dim == 1280 + LABEL_DIM + SCENE_DIM + 5
    assert extractor.identity["with_scene"]["classifier"] == "efficientnet_lite3.tflite (int8)"
    assert build_extractor(extractor.identity).identity == extractor.identity
    # ImageNet-1k in torchvision's order: 281-285 are the domestic cats, 967 espresso, 968 cup.
    for name, expected in (("chelsea", set(range(281, 286))), ("coffee", {967, 968})):
        regions = extractor.extract(getattr(data, name)())
        assert regions.features.shape == (6, extractor.feature_dim)
        scene = regions.features[:, 1280 + LABEL_DIM : 1280 + LABEL_DIM + SCENE_DIM]
        np.testing.assert_allclose(scene, np.broadcast_to(scene[0], scene.shape))
        assert abs(float(scene[0].sum()) - 1.0) < 1e-5 and scene.min() >= 0
        assert int(scene[0].argmax()) in expected, (name, int(scene[0].argmax()))
        # The geometry still closes the feature.
        np.testing.assert_allclose(regions.features[:, -5:-1] * np.tile(regions.image_size, 2), regions.boxes, atol=1e-3)


def test_the_bundled_checkpoint_passes_the_check_of_the_extractor_it_names():
    trained = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["extractor"]
    assert check_extractor(trained, build_extractor(trained).identity) == []


def test_build_extractor_by_name_and_from_identity(ssd, ssd_strict):
    rebuilt = build_extractor(ssd_strict.identity)
    assert isinstance(rebuilt, SsdEfficientNetExtractor) and rebuilt.identity == ssd_strict.identity
    with pytest.raises(ValueError, match="unknown region extractor"):
        build_extractor("yolo")
    with pytest.raises(ValueError, match="lacks the field"):
        build_extractor({"name": DEFAULT_EXTRACTOR})
    with pytest.raises(ExtractorMismatchError, match="weights"):
        build_extractor({**ssd.identity, "weights": "other-detector"})


def test_faster_rcnn_random_weights(frcnn):
    image = photo("astronaut")
    regions = frcnn.extract(image)
    check_regions(regions, 8, 2048, (512, 512))
    assert not regions.is_fill.any(), "with no score floor even random weights give 8 boxes"
    assert np.array_equal(regions.features, frcnn.extract(image).features)
    assert frcnn.identity["weights"] == "random-seed0" and frcnn.feature_dim == 2048

    nothing_passes = FasterRcnnExtractor(num_regions=4, with_geometry=True, score_threshold=1.0, **SMALL_FRCNN)
    images = [photo("coffee")[:40, :60], photo("chelsea")[:50]]
    regions = nothing_passes.extract(images[0])
    check_regions(regions, 4, 2053, (60, 40))
    assert regions.is_fill.all()
    np.testing.assert_allclose(regions.boxes, fill_boxes(4, 60, 40).numpy(), rtol=1e-6)
    # A batch is padded to one size: the same boxes, features equal up to float rounding.
    batched = nothing_passes.extract_batch(images)
    check_regions(batched[1], 4, 2053, (451, 50))
    assert np.array_equal(batched[0].boxes, regions.boxes)
    np.testing.assert_allclose(batched[0].features, regions.features, atol=1e-4)


def test_faster_rcnn_loads_local_weights(frcnn, frcnn_weights, tmp_path):
    _, path, state = frcnn_weights
    loaded = FasterRcnnExtractor(path, num_regions=8, score_threshold=0.0, **SMALL_FRCNN)
    assert torch.equal(loaded.model.state_dict()[PROBE], state[PROBE])
    assert not torch.equal(loaded.model.state_dict()[PROBE], frcnn.model.state_dict()[PROBE])
    assert loaded.identity["weights"].startswith("sha256:")
    assert loaded.identity["weights_source"] == {"path": str(path.resolve())}
    assert build_extractor(loaded.identity).identity == loaded.identity
    with pytest.raises(ExtractorMismatchError, match="weights"):
        check_extractor(loaded.identity, frcnn.identity)

    torch_file = tmp_path / "frcnn.pth"
    torch.save({PROBE: state[PROBE]}, torch_file)
    with pytest.raises(ExtractorError, match="do not fit.*missing"):
        FasterRcnnExtractor(torch_file)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights")
    with pytest.raises(ExtractorError, match="not a readable"):
        FasterRcnnExtractor(junk)


def test_faster_rcnn_loads_weights_from_hub_cache(frcnn_weights, monkeypatch):
    cache, path, state = frcnn_weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = FasterRcnnExtractor(repo_id="someone/frcnn-coco", cache_dir=cache, local_files_only=True,
                                 **SMALL_FRCNN)
    assert torch.equal(loaded.model.state_dict()[PROBE], state[PROBE])
    assert loaded.identity["weights_source"]["repo_id"] == "someone/frcnn-coco"
    local_copy = build_extractor(loaded.identity, weights=path)  # stands in for the Hub repo
    assert local_copy.identity["weights"] == loaded.identity["weights"]
    with pytest.raises(ExtractorError, match="someone/absent"):
        FasterRcnnExtractor(repo_id="someone/absent", cache_dir=cache, local_files_only=True)


# ---- image loading: every kind of bad or unusual input -------------------------------------------


def test_unreadable_files_are_refused_clearly(tmp_path, ssd):
    jpeg = tmp_path / "cat.jpg"
    Image.fromarray(photo("chelsea")).save(jpeg, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("these are not pixels")
    cases = {"truncated.jpg": "truncated", "empty.jpg": "empty file", "notes.jpg": "not an image",
             "missing.jpg": "no such file"}
    for name, reason in cases.items():
        with pytest.raises(ImageError, match=reason):
            load_image(tmp_path / name)
    with pytest.raises(ImageError, match="truncated"):
        ssd.extract(truncated)
    assert issubclass(ImageError, ValueError)


def test_image_modes_become_rgb(tmp_path):
    gray = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "gray.png")), np.stack([gray] * 3, axis=-1))

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # opaque red on top, fully transparent (black) below
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    loaded = np.asarray(load_image(tmp_path / "rgba.png"))
    assert (loaded[:4] == (255, 0, 0)).all() and (loaded[4:] == 255).all()

    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 7))
    palette.save(tmp_path / "palette.png", transparency=palette.getpixel((0, 7)))
    loaded = np.asarray(load_image(tmp_path / "palette.png"))
    assert (loaded[:4] == (255, 0, 0)).all() and (loaded[4:] == 255).all()

    Image.fromarray(photo("coffee")).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    loaded = load_image(tmp_path / "cmyk.jpg")
    assert loaded.mode == "RGB" and np.abs(np.asarray(loaded, dtype=float) - photo("coffee")).mean() < 10

    sixteen = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    assert np.array_equal(np.asarray(load_image(tmp_path / "gray16.png"))[..., 0], sixteen // 257)

    rgb16 = np.full((8, 8, 3), (65535, 32896, 0), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])
    assert (np.asarray(load_image(tmp_path / "rgb16.png")) == (255, 128, 0)).all()

    with pytest.raises(ImageError, match="mode F"):
        load_image(Image.fromarray(np.zeros((4, 4), dtype=np.float32)))


def test_exif_rotation_is_applied(tmp_path, ssd):
    image = np.zeros((30, 60, 3), dtype=np.uint8)
    image[:, :30] = (255, 0, 0)  # left half red, right half blue
    image[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(image).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "rotated.jpg"))
    assert upright.shape == (60, 30, 3)
    assert upright[5, 15, 0] > 200 and upright[55, 15, 2] > 200, "left (red) must end up on top"
    regions = ssd.extract(tmp_path / "rotated.jpg")
    assert regions.image_size == (30, 60) and (regions.boxes[:, 2] <= 30).all() and (regions.boxes[:, 3] <= 60).all()


def test_tiny_images(ssd, tmp_path):
    for size in (8, 1):
        path = tmp_path / f"tiny{size}.png"
        Image.fromarray(photo("chelsea")).resize((size, size)).save(path)
        check_regions(ssd.extract(path), 36, 1280, (size, size))


def test_huge_image_boxes_in_original_pixels(ssd, tmp_path):
    canvas = Image.new("RGB", (12000, 12000), (128, 128, 128))
    canvas.paste(Image.fromarray(photo("chelsea")).resize((4510, 3000)), (5000, 6000))
    path = tmp_path / "huge.jpg"
    canvas.save(path, quality=85)
    del canvas
    regions = ssd.extract(path)
    check_regions(regions, 36, 1280, (12000, 12000))
    assert regions.labels[0] == "cat"
    cat_box = torch.tensor([[5000, 6000, 9000, 9000]], dtype=torch.float32)  # the hand box, scaled and moved
    assert box_iou(cat_box, torch.from_numpy(regions.boxes[:1])).item() > 0.6


def test_too_many_pixels_are_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx in a file of a few kB
    assert bomb.stat().st_size < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(bomb)
    Image.fromarray(photo("chelsea")).save(tmp_path / "cat.png")
    with pytest.raises(ImageError, match="exceeds the limit of 100,000"):
        load_image(tmp_path / "cat.png", max_pixels=100_000)
    with pytest.raises(ImageError, match="exceeds"):
        load_image(np.zeros((400, 400), dtype=np.uint8), max_pixels=100_000)


def test_numpy_inputs():
    assert np.array_equal(np.asarray(load_image(np.full((4, 5, 1), 7, np.uint8))), np.full((4, 5, 3), 7))
    assert (np.asarray(load_image(np.full((4, 5, 3), 65535, np.uint16))) == 255).all()
    assert (np.asarray(load_image(np.full((4, 5), 0.5))) == 128).all()
    rgba = np.zeros((4, 5, 4), np.uint8)
    assert (np.asarray(load_image(rgba)) == 255).all(), "transparent pixels show the white background"
    for bad, reason in [(np.zeros((4, 5, 2), np.uint8), "not an image"), (np.zeros((0, 5), np.uint8), "no pixels"),
                        (np.full((4, 5), 2.0), r"\[0, 1\]"), (np.zeros((4, 5), np.int64), "dtype")]:
        with pytest.raises(ImageError, match=reason):
            load_image(bad)
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(3)
