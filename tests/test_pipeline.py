"""adapt.pipeline and adapt.visualize on a stub extractor: which extractor a Retriever accepts, the
region cache (damaged files are misses), the in-memory gallery, and the attention drawing."""

import numpy as np
import pytest
import torch
from PIL import Image

from adapt import AdaptConfig, AdaptModel, build_vocab
from adapt.gallery import GalleryModelError, MemoryGallery
from adapt.cache import RegionCache
from adapt.pipeline import Retriever
from adapt.regions import ExtractorMismatchError, PooledRegionExtractor, Regions
from adapt.regions.base import Detections
from adapt.visualize import draw_attention

CAPTIONS = ["a red square", "a blue sky", "green grass"]


class StubExtractor(PooledRegionExtractor):
    """Three fixed quarter-image boxes pooled from a tiny colour map: the pipeline is under test,
    not a detector. ``weights`` names its seed, so two seeds are two different extractors."""

    name = "stub"
    backbone_dim = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__(num_regions=4, with_geometry=False, score_threshold=0.0, nms_iou=0.5,
                         max_pixels=10**7, device="cpu")
        self.seed = seed
        self.images_seen = 0

    def _detect(self, images):
        self.images_seen += len(images)
        projection = torch.randn(8, 3, generator=torch.Generator().manual_seed(self.seed))
        detections = []
        for image in images:
            w, h = image.size
            colours = torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32) / 255)  # (4, 4, 3)
            detections.append(Detections(
                boxes=torch.tensor([[0, 0, w / 2, h / 2], [w / 2, 0, w, h / 2], [0, h / 2, w / 2, h]]),
                scores=torch.tensor([0.9, 0.8, 0.7]), class_ids=torch.tensor([17, 18, 1]),
                feature_map=torch.einsum("fc,yxc->fyx", projection, colours), feature_scale=(4 / w, 4 / h)))
        return detections

    def _backend_identity(self):
        return {"weights": f"random-{self.seed}", "preprocessing": {"feature_map": "4x4 colours, projected"}}


def small_model(extractor_identity):
    torch.manual_seed(0)
    config = AdaptConfig(region_dim=StubExtractor.backbone_dim, latent_size=16, similarity="t2i",
                         word_vectors="random", word_dim=8, vocab=build_vocab(CAPTIONS),
                         extractor=extractor_identity)
    return AdaptModel(config).eval()


@pytest.fixture(scope="module")
def model():
    return small_model(StubExtractor().identity)


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 80, 3), dtype=np.uint8))


def test_a_caller_supplied_extractor_of_the_models_kind_is_used(model):
    extractor = StubExtractor()
    retriever = Retriever(model, extractor=extractor)
    assert retriever.extractor is extractor
    ranked = retriever.rank_captions(picture(), CAPTIONS)
    assert extractor.images_seen == 1 and sorted(ranked.captions) == sorted(CAPTIONS)
    assert ranked.region_weights.shape == (3, 4)
    assert ranked.neutral_weights.shape == (4,) and ranked.neutral_weights.sum() == pytest.approx(1, abs=1e-5)


def test_another_extractor_is_refused_unless_the_mismatch_is_allowed(model):
    other = StubExtractor(seed=1)
    with pytest.raises(ExtractorMismatchError, match="weights: model has 'random-0', extractor has 'random-1'"):
        Retriever(model, extractor=other)
    with pytest.warns(UserWarning, match="region extractor mismatch"):
        retriever = Retriever(model, extractor=other, allow_extractor_mismatch=True)
    assert retriever.extractor is other
    assert len(retriever.rank_captions(picture(), CAPTIONS).captions) == 3


def test_a_model_that_names_no_extractor_needs_one_and_the_mismatch_allowed():
    unknown = small_model(None)
    with pytest.raises(ValueError, match="does not name the region extractor.*allow_extractor_mismatch=True"):
        Retriever(unknown)
    with pytest.raises(ExtractorMismatchError, match="unknown origin"):
        Retriever(unknown, extractor=StubExtractor())
    with pytest.warns(UserWarning, match="unknown origin"):
        retriever = Retriever(unknown, extractor=StubExtractor(), allow_extractor_mismatch=True)
    assert len(retriever.rank_captions(picture(), CAPTIONS).captions) == 3


def test_cached_regions_skip_extraction_and_a_truncated_cache_file_is_recomputed(model, tmp_path):
    extractor = StubExtractor()
    retriever = Retriever(model, extractor=extractor, cache_dir=tmp_path)
    key, first = retriever.regions(picture())
    assert retriever.regions(picture())[1].features.tobytes() == first.features.tobytes()
    assert extractor.images_seen == 1, "the second call is a cache hit"

    cached = retriever.cache.folder / f"{key}.npz"
    cached.write_bytes(cached.read_bytes()[:200])  # as a full disk or a killed copy leaves it
    again_key, again = retriever.regions(picture())
    assert extractor.images_seen == 2, "a damaged cache file is a miss"
    assert again_key == key
    np.testing.assert_array_equal(again.features, first.features)
    assert RegionCache(tmp_path, extractor.identity).get(key).features.tobytes() == first.features.tobytes()
    assert [p.name for p in retriever.cache.folder.iterdir()] == [cached.name], "no temporary files left"


def test_gallery_add_replaces_an_existing_key(model):
    retriever = Retriever(model, extractor=StubExtractor())
    old, other, new = (retriever.regions(picture(seed))[1] for seed in (1, 2, 3))
    gallery = MemoryGallery(retriever.model)
    gallery.add("a", old)
    gallery.add("b", other)
    assert {hit.key: hit.regions for hit in retriever.search([gallery], CAPTIONS[0])}["a"] is old
    gallery.add("a", new)
    assert gallery.keys == ["a", "b"] and gallery.regions == [new, other]
    hits = {hit.key: hit for hit in retriever.search([gallery], CAPTIONS[0])}
    assert len(hits) == 2 and hits["a"].regions is new, "the encoded gallery was rebuilt"
    expected = retriever.rank_captions(new, [CAPTIONS[0]]).scores[0]
    assert hits["a"].score == pytest.approx(float(expected), abs=1e-6)


def test_a_gallery_is_searched_only_with_the_model_that_encoded_it(model):
    retriever = Retriever(model, extractor=StubExtractor())
    other = AdaptModel(model.config)
    gallery = MemoryGallery(other)
    gallery.add("a", retriever.regions(picture(1))[1])
    with pytest.raises(GalleryModelError, match="another model"):
        retriever.search([gallery], CAPTIONS[0])


def test_draw_attention_lights_the_most_attended_box_brightest():
    image = Image.new("RGB", (300, 100), (200, 200, 200))
    boxes = np.array([[0, 0, 100, 100], [100, 0, 200, 100], [200, 0, 300, 100]], dtype=np.float32)
    regions = Regions(boxes=boxes, features=np.zeros((3, 1), np.float32), labels=["a", "b", "c"],
                      scores=np.ones(3, np.float32), is_fill=np.zeros(3, bool), image_size=(300, 100))
    weights = np.array([0.1, 0.6, 0.3])
    drawn = np.asarray(draw_attention(image, regions, weights, top=1), dtype=np.float64)
    # The middle of each box, clear of its outline and label.
    inside = [drawn[40:90, x + 20:x + 80].mean() for x in (0, 100, 200)]
    assert inside[1] == 200, "the most attended region keeps its colour"
    assert inside[1] > inside[2] > inside[0]
    assert inside[0] == pytest.approx(200 * 0.3, abs=1), "the least attended are dimmed to 30 %"
