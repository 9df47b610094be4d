"""Concept-grounded regions (ConSE): the concept vectors, the ConSE start, checkpoints, and the
frozen transformer's memoised states."""

import pytest
import torch

from adapt import AdaptConfig, AdaptModel
from adapt.concepts import default_concepts, embed_names
from adapt.regions.base import LABEL_DIM

BACKBONE = 1280
REGION_DIM = BACKBONE + LABEL_DIM + 5


@pytest.fixture(scope="module")
def model():
    config = AdaptConfig(region_dim=REGION_DIM, latent_size=768, similarity="ensemble", text_encoder="transformer",
                         region_encoder="concepts", concepts=default_concepts(top_k=3))
    torch.manual_seed(0)
    return AdaptModel(config).eval()


def features(n_images=2, n_regions=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    backbone = torch.rand(n_images, n_regions, BACKBONE, generator=g)
    labels = torch.zeros(n_images, n_regions, LABEL_DIM)
    labels[0, 1, 0] = 0.9  # a "person" at 0.9 in image 0, region 1
    geometry = torch.rand(n_images, n_regions, 5, generator=g)
    return torch.cat([backbone, labels, geometry], dim=-1)


def test_the_default_concepts_name_every_imagenet_class_and_coco_slot():
    concepts = default_concepts()
    assert len(concepts["classes"]) == 1000 and concepts["classes"][281] == "tabby"
    # Each class's WordNet description, in the classifier's order (timm's list against torchvision's).
    assert len(concepts["descriptions"]) == 1000
    assert concepts["descriptions"][281] == "tabby, tabby cat: a cat with a grey or tawny coat mottled with black"
    for name, description in zip(concepts["classes"], concepts["descriptions"]):
        first_lemma = description.split(":")[0].split(",")[0]
        assert name.lower()[:3] == first_lemma.lower()[:3], (name, description)
    assert len(concepts["labels"]) == LABEL_DIM and concepts["labels"][0] == "person"


def test_concept_vectors_weight_the_top_k_class_names_and_the_detector_labels(model):
    encoder, x = model.region_encoder, features()
    probs = torch.softmax(encoder.classifier(x[..., :BACKBONE]), dim=-1)
    expected = torch.zeros(*x.shape[:2], encoder.class_names.shape[1])
    for i in range(x.shape[0]):
        for r in range(x.shape[1]):
            top = torch.topk(probs[i, r], 3)
            expected[i, r] = (top.values[:, None] * encoder.class_names[top.indices]).sum(0)
    expected[0, 1] += 0.9 * encoder.label_names[0]
    torch.testing.assert_close(encoder.concept_vectors(x), expected)


def test_the_scene_weight_mixes_the_whole_photos_concepts_into_every_regions(model):
    config = AdaptConfig(region_dim=REGION_DIM + 1000, latent_size=768, similarity="t2i", text_encoder="transformer",
                         region_encoder="concepts", concepts=default_concepts(top_k=3, scene_weight=0.25))
    encoder = AdaptModel(config).region_encoder  # the same classifier and names as the fixture's
    x = features()
    scene = torch.zeros(1000)
    scene[[281, 967]] = torch.tensor([0.7, 0.3])  # the photo: a tabby, some espresso
    with_scene = torch.cat([x[..., : BACKBONE + LABEL_DIM], scene.expand(*x.shape[:2], -1), x[..., -5:]], dim=-1)
    scene_vector = 0.7 * encoder.class_names[281] + 0.3 * encoder.class_names[967]
    regions_only = model.region_encoder.concept_vectors(x)
    labels = x[..., BACKBONE : BACKBONE + LABEL_DIM] @ encoder.label_names
    expected = 0.75 * (regions_only - labels) + 0.25 * scene_vector + labels
    torch.testing.assert_close(encoder.concept_vectors(with_scene), expected)
    with pytest.raises(ValueError, match="scene_weight"):
        AdaptModel(AdaptConfig.from_dict({**config.to_dict(), "concepts": {**config.concepts, "scene_weight": 1.5}}))
    with pytest.raises(ValueError, match="1000 scene values"):
        AdaptModel(AdaptConfig.from_dict({**config.to_dict(), "region_dim": REGION_DIM}))


def test_a_fresh_model_starts_from_the_names_embedded_by_its_own_text_encoder(model):
    encoder = model.region_encoder
    description = model.config.concepts["descriptions"][281]
    torch.testing.assert_close(encoder.class_names[281], embed_names(model.text_encoder, [description])[0])
    torch.testing.assert_close(encoder.label_names[0], embed_names(model.text_encoder, ["person"])[0])
    # [I; -I] on both sides, and no raw-feature term: the region's latent is its concept vector, signed.
    assert torch.count_nonzero(encoder.fc.weight) == 0
    eye = torch.eye(384)
    torch.testing.assert_close(encoder.fc_concepts.weight, torch.cat([eye, -eye]))
    torch.testing.assert_close(model.text_encoder.proj.weight, torch.cat([eye, -eye]))
    # Its frozen parts stay frozen in training.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not trainable & {"region_encoder.classifier.weight", "region_encoder.class_names",
                            "region_encoder.label_names"}


def test_a_concepts_table_without_descriptions_embeds_the_class_names(model):
    concepts = {k: v for k, v in default_concepts(top_k=3).items() if k != "descriptions"}
    config = AdaptConfig(region_dim=REGION_DIM, latent_size=768, text_encoder="transformer",
                         region_encoder="concepts", concepts=concepts)
    encoder = AdaptModel(config).region_encoder
    torch.testing.assert_close(encoder.class_names[281], embed_names(model.text_encoder, ["tabby"])[0])


def test_a_caption_naming_a_regions_concept_scores_higher_at_the_start(model):
    x = features(n_images=1, n_regions=2)
    x[0, :, :BACKBONE] = 0
    x[0, 0, BACKBONE] = 1.0  # one region: the detector's "person" at full score
    scores = model.score(x, ["a person", "a bowl of soup"], directions=("t2i",)).scores
    assert scores[0, 0] > scores[0, 1]


def test_a_concept_checkpoint_carries_its_tables_and_scores_the_same(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AdaptModel.from_pretrained(tmp_path)
    x = features()
    captions = ["a tabby cat", "two people on a beach"]
    torch.testing.assert_close(loaded.score(x, captions).scores, model.score(x, captions).scores)
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 30 * 2**20


def test_memoised_transformer_states_equal_fresh_ones_and_stay_bounded(model):
    text = model.text_encoder
    captions = ["a dog running on the grass", "a cat", "a red bus in a busy street"]
    batch = text.tokenize(captions)
    with torch.no_grad():
        fresh = text.backbone(input_ids=batch.ids, attention_mask=batch.mask.long()).last_hidden_state
    fresh = fresh * batch.mask.unsqueeze(-1)
    text._memo.clear()
    text._memo_size = 0
    torch.testing.assert_close(text.hidden_states(batch), fresh, atol=1e-5, rtol=1e-4)
    assert len(text._memo) == 3
    # A second batch mixing known and new captions, padded differently, gives the same states.
    again = text.tokenize(["a cat", "an astronaut floating above the earth in a white suit"])
    states = text.hidden_states(again)
    torch.testing.assert_close(states[0, : int(again.mask[0].sum())], fresh[1, : int(batch.mask[1].sum())],
                               atol=1e-5, rtol=1e-4)
    boat = text.tokenize(["a boat"])
    # Room for the newest caption's states and the boat's: the two most recent stay, the rest go.
    boat_bytes = int(boat.mask.sum()) * text.backbone.config.hidden_size * 4
    old_limit, text.memo_bytes = text.memo_bytes, text._memo[next(reversed(text._memo))].nbytes + boat_bytes
    try:
        text.hidden_states(boat)
        assert len(text._memo) == 2
        assert text._memo_size == sum(states.nbytes for states in text._memo.values()) <= text.memo_bytes
    finally:
        text.memo_bytes = old_limit


def test_concepts_need_the_transformer_text_encoder():
    with pytest.raises(ValueError, match="needs text_encoder=\"transformer\""):
        AdaptConfig(region_dim=REGION_DIM, latent_size=768, region_encoder="concepts", concepts=default_concepts())
