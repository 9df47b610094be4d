"""Two-stage gallery search: incremental sharded storage, memory maps, exactness against exhaustive
ADAPT, first-stage recall, the compressed ANN path, and refusing an index built with another model."""

import dataclasses
import json

import faiss
import numpy as np
import pytest
import torch
from conftest import concept_data

from adapt import AdaptConfig, AdaptModel, HingeLoss, build_vocab
from adapt import search
from adapt.gallery import MemoryGallery
from adapt.regions import Regions
from adapt.search import (
    GalleryIndex,
    GalleryIndexError,
    ImageDetails,
    QdrantFirstStage,
    candidates,
    merge_top_k,
    top_candidates,
)

N_GALLERY = 300


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: a second OpenMP thread only adds synchronisation, which on a shared
    2-core machine made the module ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny_model(latent_size: int = 32, epochs: int = 3) -> AdaptModel:
    """A T2I model trained briefly on concept data, so that both search stages mean something."""
    torch.manual_seed(0)
    images, captions = concept_data(512)
    config = AdaptConfig(region_dim=32, latent_size=latent_size, similarity="t2i",
                         word_vectors="random", word_dim=32, vocab=build_vocab(captions))
    model = AdaptModel(config).train()
    loss_fn = HingeLoss()
    optimizer = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(32):
            loss = loss_fn(model(images[batch], [captions[i] for i in batch]).scores)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> AdaptModel:
    return train_tiny_model()


@pytest.fixture(scope="module")
def data():
    """Gallery images ``(300, 8, 32)``, their boxes ``(300, 8, 4)`` and ids."""
    images, _ = concept_data(N_GALLERY, seed=1)
    boxes = np.random.default_rng(1).uniform(0, 100, size=(N_GALLERY, images.shape[1], 4))
    return images.numpy(), boxes.astype(np.float32), [f"img-{i}" for i in range(N_GALLERY)]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, model, data) -> GalleryIndex:
    """300 images in shards of 128, added in two goes with a reopen in between."""
    images, boxes, ids = data
    folder = tmp_path_factory.mktemp("gallery")
    GalleryIndex.create(folder, model, shard_size=128).add(images[:100], boxes[:100], ids[:100])
    GalleryIndex.open(folder, model).add(images[100:], boxes[100:], ids[100:])
    return GalleryIndex.open(folder, model)


def queries(n: int = 20) -> list[str]:
    return concept_data(n, seed=7)[1]


def keys(hits) -> list[str]:
    return [hit.key for hit in hits]


def recall_at_10(found, truth) -> float:
    return float(np.mean([len(set(keys(f)) & set(keys(t))) / 10 for f, t in zip(found, truth)]))


def test_incremental_adds_append_in_order_and_never_rewrite_full_shards(tmp_path, model, data):
    images, boxes, ids = data
    np.save(tmp_path / "features.npy", images[:100])
    index = GalleryIndex.create(tmp_path / "index", model, shard_size=64)
    index.add(np.load(tmp_path / "features.npy", mmap_mode="r"), boxes[:100], ids[:100])
    assert [s.count for s in index.shards] == [64, 36]
    full_shard = tmp_path / "index" / "shard-00000"
    full = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in full_shard.iterdir()}

    index = GalleryIndex.open(tmp_path / "index", model)
    index.add(torch.from_numpy(images[100:150]), None, ids[100:150])
    assert [s.count for s in index.shards] == [64, 64, 22]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in full_shard.iterdir()} == full

    index = GalleryIndex.open(tmp_path / "index", model)
    assert len(index) == 150
    assert [i for s in index.shards for i in s.ids] == ids[:150]
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["count"] == 150 and [s["count"] for s in manifest["shards"]] == [64, 64, 22]
    stored = np.concatenate([s.regions for s in index.shards]).astype(np.float32)
    with torch.inference_mode():
        encoded = model.encode_regions(torch.from_numpy(images[:150])).numpy()
    np.testing.assert_allclose(stored, encoded, atol=1e-3)  # float16 on disk
    stored_boxes = np.concatenate([s.boxes for s in index.shards])
    np.testing.assert_array_equal(stored_boxes[:100], boxes[:100])
    assert np.isnan(stored_boxes[100:]).all()  # added without boxes


def test_stored_arrays_are_float16_memory_maps(gallery):
    assert [s.count for s in gallery.shards] == [128, 128, 44]
    for shard in gallery.shards:
        assert isinstance(shard.regions, np.memmap) and shard.regions.dtype == np.float16
        assert isinstance(shard.boxes, np.memmap) and shard.boxes.dtype == np.float32
        assert shard.regions.shape == (shard.count, 8, gallery.model.config.latent_size)


def test_two_stage_with_every_image_as_candidate_is_exhaustive_adapt(gallery, model, data):
    _, boxes, ids = data
    captions = queries()
    two_stage = gallery.search(captions, top_k=10, candidates=len(gallery))
    exhaustive = gallery.search_exhaustive(captions, top_k=10)
    # And against one plain similarity call over the whole stored gallery.
    regions = torch.from_numpy(np.concatenate([s.regions for s in gallery.shards]).astype(np.float32))
    with torch.inference_mode():
        words, mask = model.encode_text(captions)
        scores = model.similarity(regions, words, mask).scores.numpy()  # (n_images, n_captions)
    for q, (found, truth) in enumerate(zip(two_stage, exhaustive)):
        best = np.argsort(-scores[:, q])[:10]
        assert keys(found) == keys(truth) == [ids[i] for i in best]
        np.testing.assert_allclose([h.score for h in found], scores[best, q], rtol=0, atol=1e-6)
        np.testing.assert_allclose([h.score for h in truth], scores[best, q], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.stack([h.regions.boxes for h in found]), boxes[best])


def test_first_stage_recall_grows_with_candidates_and_fovea_max_beats_the_mean(
    gallery, tmp_path, model, data
):
    images, boxes, ids = data
    mean = GalleryIndex.create(tmp_path, model, shard_size=128, vector_kind="mean")
    mean.add(images, boxes, ids)
    captions = queries()
    truth = gallery.search_exhaustive(captions, top_k=10)
    assert [keys(r) for r in mean.search_exhaustive(captions, top_k=10)] == [keys(r) for r in truth]
    recalls = {
        index.vector_kind: {k: recall_at_10(index.search(captions, top_k=10, candidates=k), truth)
                            for k in (10, 20, 40, len(gallery))}
        for index in (gallery, mean)
    }
    print("recall@10 of two-stage vs exhaustive ADAPT, by first stage and candidates:", recalls)
    for by_k in recalls.values():
        assert list(by_k.values()) == sorted(by_k.values()) and by_k[len(gallery)] == 1.0
    assert recalls["fovea-max"][20] >= 0.9, recalls  # 20 random candidates of 300 would give 0.07
    assert recalls["fovea-max"][20] > recalls["mean"][20]


def test_fovea_max_score_is_t2i_in_the_limit_of_a_hard_fovea(model):
    sharp = AdaptModel(AdaptConfig(**{**model.config.to_dict(), "lambda_t2i": 1e4})).eval()
    sharp.load_state_dict(model.state_dict())
    with torch.no_grad():  # make some of gamma + 1 negative, so that minima are taken too
        sharp.similarity.heads["t2i"].adapt.fc_gamma.weight.mul_(30)
    images, _ = concept_data(20, seed=5)
    with torch.inference_mode():
        regions = sharp.encode_regions(images)
        words, mask = sharp.encode_text(queries(6))
        exact = sharp.similarity(regions, words, mask).scores.numpy()  # (20, 6)
        vectors = search.image_vectors(sharp, "fovea-max", regions).numpy()
    captions = search.caption_queries(sharp, "fovea-max", words, mask)
    scale = np.split(captions, 3, axis=1)[1]
    assert (scale < 0).any() and (scale > 0).any()
    hard = np.stack([search.first_stage_scores("fovea-max", c, vectors) for c in captions], axis=1)
    np.testing.assert_allclose(hard, exact, atol=1e-4)


def test_large_shard_switches_to_a_compressed_index_that_keeps_exact_scores(
    tmp_path, model, monkeypatch
):
    monkeypatch.setattr(candidates, "ANN_MIN_ROWS", 1000)
    n = 1200
    images, _ = concept_data(n, seed=3)
    index = GalleryIndex.create(tmp_path, model, shard_size=2000)
    index.add(images[:900], None, [str(i) for i in range(900)])
    assert isinstance(index.shards[0].ann, faiss.IndexFlatIP)
    GalleryIndex.open(tmp_path, model).add(images[900:], None, [str(i) for i in range(900, n)])
    index = GalleryIndex.open(tmp_path, model)
    ann = index.shards[0].ann
    assert isinstance(ann, faiss.IndexRefineFlat) and ann.ntotal == n
    assert ann.k_factor == search.REFINE_FACTOR
    captions = queries(8)
    truth = index.search_exhaustive(captions, top_k=10)
    assert [keys(r) for r in index.search(captions, top_k=10, candidates=n)] == [keys(r) for r in truth]
    assert recall_at_10(index.search(captions, top_k=10, candidates=40), truth) >= 0.9


def test_an_add_that_died_before_writing_the_manifest_leaves_a_usable_index(tmp_path, model, data):
    images, boxes, ids = data
    GalleryIndex.create(tmp_path, model, shard_size=64).add(images[:80], boxes[:80], ids[:80])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # As if the last add had been of 50 images: its second shard and the first's last 14 rows,
    # ids and FAISS entries were written, the manifest not.
    manifest["shards"] = [{"name": "shard-00000", "count": 50}]
    manifest["count"] = 50
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    index = GalleryIndex.open(tmp_path, model)
    assert len(index) == 50 and index.shards[0].ann.ntotal == 50 and index.shards[0].ids == ids[:50]
    index.add(images[50:100], boxes[50:100], ids[50:100])  # reuses the orphaned shard-00001 folder
    index = GalleryIndex.open(tmp_path, model)
    assert [s.count for s in index.shards] == [64, 36]
    assert [i for s in index.shards for i in s.ids] == ids[:100]


def test_an_index_refuses_a_different_model(gallery, model):
    retrained = AdaptModel(model.config)  # same architecture, other weights
    with pytest.raises(GalleryIndexError, match="different model.*weights_sha256.*GalleryIndex.create"):
        GalleryIndex.open(gallery.folder, retrained)
    wider = AdaptModel(AdaptConfig(**{**model.config.to_dict(), "latent_size": 48}))
    with pytest.raises(GalleryIndexError, match="latent_size: index 32, model 48"):
        GalleryIndex.open(gallery.folder, wider)


def test_an_index_refuses_a_model_of_another_extractor_but_not_reworded_descriptions(tmp_path, model, data):
    identity = {"name": "stub", "format": 1, "num_regions": 8,
                "selection": {"nms_iou": 0.5, "fill": "whole image, then grids"}}

    def same_weights(extractor):
        copy = AdaptModel(AdaptConfig(**{**model.config.to_dict(), "extractor": extractor})).eval()
        copy.load_state_dict(model.state_dict())
        return copy

    images, boxes, ids = data
    GalleryIndex.create(tmp_path, same_weights(identity)).add(images[:10], boxes[:10], ids[:10])
    reworded = {**identity, "selection": {**identity["selection"], "fill": "the whole image, then 2x2, 3x3 grids"}}
    assert len(GalleryIndex.open(tmp_path, same_weights(reworded))) == 10
    with pytest.raises(GalleryIndexError, match="(?s)different model.*num_regions: index has 8, model has 36.*"
                                                "GalleryIndex.create"):
        GalleryIndex.open(tmp_path, same_weights({**identity, "num_regions": 36}))
    with pytest.raises(GalleryIndexError, match="the model does not record which region extractor"):
        GalleryIndex.open(tmp_path, same_weights(None))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(GalleryIndexError, match="format version 1.*rebuild it with GalleryIndex.create"):
        GalleryIndex.open(tmp_path, same_weights(identity))


def test_the_manifest_keeps_the_first_stage_key_of_indexes_written_before(tmp_path, model, data):
    images, boxes, ids = data
    GalleryIndex.create(tmp_path, model, shard_size=64, vector_kind="mean").add(images[:10], boxes[:10], ids[:10])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["first_stage"] == "mean" and "vector_kind" not in manifest
    assert GalleryIndex.open(tmp_path, model).vector_kind == "mean"


def test_bad_inputs_get_clear_errors(tmp_path, model, data):
    images, boxes, ids = data
    i2t = AdaptModel(AdaptConfig(**{**model.config.to_dict(), "similarity": "i2t"}))
    with pytest.raises(GalleryIndexError, match="use vector_kind='mean'"):
        GalleryIndex.create(tmp_path / "i2t", i2t, vector_kind="fovea-max")
    assert GalleryIndex.create(tmp_path / "i2t", i2t).vector_kind == "mean"
    index = GalleryIndex.create(tmp_path, model, shard_size=64)
    with pytest.raises(GalleryIndexError, match="no images yet"):
        index.search(["thing1"])
    with pytest.raises(ValueError, match=r"shape \(n, n_regions, 32\)"):
        index.add(images[:4, :, :16], None, ids[:4])
    with pytest.raises(ValueError, match="got 4 images but 3 ids"):
        index.add(images[:4], None, ids[:3])
    with pytest.raises(ValueError, match="boxes must have shape"):
        index.add(images[:4], boxes[:4, :, :2], ids[:4])
    index.add(images[:4], None, ids[:4])
    with pytest.raises(ValueError, match="holds 8 regions per image, got 6"):
        index.add(images[:4, :6], None, ids[:4])
    with pytest.raises(ValueError, match="top_k <= candidates"):
        index.search(["thing1"], top_k=10, candidates=5)
    with pytest.raises(GalleryIndexError, match="already holds a gallery index"):
        GalleryIndex.create(tmp_path, model)
    with pytest.raises(GalleryIndexError, match="no readable manifest.json"):
        GalleryIndex.open(tmp_path / "nothing", model)


def test_shard_merges_need_only_scores_and_ids():
    shard_a = [(0.9, "a1"), (0.5, "a2")]
    shard_b = [(0.7, "b1"), (0.6, "b2"), (0.1, "b3")]
    assert merge_top_k([shard_a, shard_b], 3) == [(0.9, "a1"), (0.7, "b1"), (0.6, "b2")]
    scores = [np.array([[0.9, 0.2]]), np.array([[0.8, 0.0]])]
    rows = [np.array([[4, 7]]), np.array([[3, -1]])]  # FAISS pads missing hits with -1
    shard, row = top_candidates(scores, rows, 3)
    assert shard.tolist() == [[0, 1, 0]] and row.tolist() == [[4, 3, 7]]


def test_a_config_field_added_with_its_default_keeps_indexes_valid(gallery, model):
    """The fingerprint records the config field by field: a field added to AdaptConfig later, left
    at its default, matches an index built before it existed; set otherwise, it is named."""
    newer = dataclasses.make_dataclass("NewerConfig", [("new_option", float, dataclasses.field(default=0.5))],
                                       bases=(AdaptConfig,))
    assert "new_option" not in json.loads((gallery.folder / "manifest.json").read_text())["model"]["config"]
    original = model.config
    try:
        model.config = newer(**original.to_dict())
        assert len(GalleryIndex.open(gallery.folder, model)) == N_GALLERY
        model.config = newer(**original.to_dict(), new_option=2.0)
        with pytest.raises(GalleryIndexError, match="new_option: index 0.5, model 2.0"):
            GalleryIndex.open(gallery.folder, model)
    finally:
        model.config = original


def hit_table(hits) -> list[list[str]]:
    return [keys(per_caption) for per_caption in hits]


def test_memory_gallery_faiss_and_qdrant_indexes_give_the_same_hits(tmp_path, model, data):
    pytest.importorskip("qdrant_client")
    images, boxes, ids = data
    n = 120
    memory = MemoryGallery(model)
    for i in range(n):
        memory.add(ids[i], Regions(boxes=boxes[i], features=images[i], labels=[f"l{j}" for j in range(8)],
                                   scores=np.ones(8, np.float32), is_fill=np.zeros(8, bool), image_size=(100, 100)))
    faiss_index = GalleryIndex.create(tmp_path / "faiss", model, shard_size=50)
    qdrant_index = GalleryIndex.create(tmp_path / "qdrant", model, shard_size=50,
                                       qdrant=QdrantFirstStage.connect(":memory:", "test-gallery"))
    details = [ImageDetails.of(r) for r in memory.regions]
    for index in (faiss_index, qdrant_index):
        index.add(images[:70], boxes[:70], ids[:70], details[:70])
        index.add(images[70:n], boxes[70:n], ids[70:n], details[70:n])
    captions = queries(6)
    expected = memory.search(captions, top_k=5)
    for index in (faiss_index, qdrant_index):
        found = index.search(captions, top_k=5, candidates=n)
        assert hit_table(found) == hit_table(expected)
        for mine, theirs in zip(found, expected):
            for a, b in zip(mine, theirs):
                assert a.score == pytest.approx(b.score, abs=2e-3)  # the index stores float16
                np.testing.assert_allclose(a.region_weights, b.region_weights, atol=2e-3)
                np.testing.assert_allclose(a.neutral_weights, b.neutral_weights, atol=2e-3)
                np.testing.assert_array_equal(a.regions.boxes, b.regions.boxes)
                assert a.regions.labels == b.regions.labels and a.regions.image_size == (100, 100)
    # With fewer candidates the first stages agree with each other too.
    assert hit_table(faiss_index.search(captions, 5, candidates=20)) == \
        hit_table(qdrant_index.search(captions, 5, candidates=20))


def test_a_qdrant_index_reopens_its_local_collection_and_ignores_points_of_a_dead_add(tmp_path, model, data):
    pytest.importorskip("qdrant_client")
    images, boxes, ids = data
    index = GalleryIndex.create(tmp_path, model, shard_size=64,
                                qdrant=QdrantFirstStage.connect("qdrant", "local", tmp_path))
    index.add(images[:80], boxes[:80], ids[:80])
    # As if an add of 20 more had upserted its points and died before the manifest.
    with torch.inference_mode():
        vectors = candidates.image_vectors(model, "fovea-max", model.encode_regions(torch.from_numpy(images[80:100])))
    index.qdrant.add(80, vectors.numpy())
    index.close()
    index = GalleryIndex.open(tmp_path, model)
    assert index.qdrant.location == "qdrant" and (tmp_path / "qdrant").is_dir()
    found = index.search(queries(10), top_k=10, candidates=100)
    assert all(set(keys(hits)) <= set(ids[:80]) for hits in found)
    index.add(images[80:90], boxes[80:90], ids[80:90])
    assert len(index) == 90 and index.qdrant.client.count("local").count == 100
    assert hit_table(index.search(queries(10), 10, candidates=90)) == hit_table(index.search_exhaustive(queries(10)))
    with pytest.raises(GalleryIndexError, match="one process at a time"):
        GalleryIndex.open(tmp_path, model)
    index.close()
    with pytest.raises(GalleryIndexError, match="exists already"):
        GalleryIndex.create(tmp_path / "other", model, qdrant=QdrantFirstStage.connect("../qdrant", "local",
                                                                                        tmp_path / "other"))


def test_ids_already_in_the_index_are_refused(tmp_path, model, data):
    images, _, ids = data
    index = GalleryIndex.create(tmp_path, model)
    index.add(images[:5], None, ids[:5])
    assert ids[0] in index and ids[5] not in index
    with pytest.raises(ValueError, match="must be new and distinct; repeated: \\['img-4'\\]"):
        index.add(images[4:6], None, ids[4:6])


def test_trim_cuts_the_files_to_the_images_and_a_later_add_extends_them(tmp_path, model, data):
    images, boxes, ids = data
    index = GalleryIndex.create(tmp_path, model, shard_size=64)
    index.add(images[:40], boxes[:40], ids[:40])
    regions_file = tmp_path / "shard-00000" / "regions.npy"
    full = regions_file.stat().st_size
    index.trim()
    assert np.load(regions_file, mmap_mode="r").shape[0] == 40 and regions_file.stat().st_size < full * 40 / 64 + 1024
    truth = [keys(r) for r in index.search_exhaustive(queries(5))]
    index = GalleryIndex.open(tmp_path, model)
    assert [keys(r) for r in index.search(queries(5), candidates=40)] == truth
    index.add(images[40:100], boxes[40:100], ids[40:100])
    assert [s.count for s in index.shards] == [64, 36]
    index.trim()
    index = GalleryIndex.open(tmp_path, model)
    assert [i for s in index.shards for i in s.ids] == ids[:100]
    np.testing.assert_array_equal(np.concatenate([s.boxes for s in index.shards]), boxes[:100])
