"""AdaptModel: encoders, gradients, checkpoints (local folder and Hub cache), and a tiny training run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import concept_data

from adapt import AdaptConfig, AdaptModel, CheckpointError, ConfigError, HingeLoss, build_vocab, tokenize
from adapt.encoders import WORD_VECTOR_SOURCES, TransformerTextEncoder

CAPTIONS = ["A cat sits on the mat.", "two dogs run", "a red bus, parked near a tree", "dogs"]


def small_config(**overrides):
    values = dict(region_dim=12, latent_size=16, similarity="ensemble", word_vectors="random",
                  word_dim=8, vocab=build_vocab(CAPTIONS))
    return AdaptConfig(**{**values, **overrides})


def regions(n=5, dim=12, seed=0):
    return torch.randn(n, 6, dim, generator=torch.Generator().manual_seed(seed))


def test_tokenizer_is_offline_and_unicode_aware():
    assert tokenize("A dog's toy, 2 cats!") == ["a", "dog", "'", "s", "toy", ",", "2", "cats", "!"]
    assert tokenize("Ein Hund läuft 🐕") == ["ein", "hund", "läuft", "🐕"]


def test_vocab_is_deterministic_with_padding_and_unknown_first():
    vocab = build_vocab(["b a", "a c", "c a"])
    assert vocab == ["<pad>", "<unk>", "a", "c", "b"]


def test_region_and_word_features_are_unit_norm_and_padding_is_zero():
    model = AdaptModel(small_config())
    feats = model.encode_regions(regions())
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(5, 6))
    words, mask = model.encode_text(CAPTIONS)
    assert mask.sum(1).tolist() == [len(tokenize(c)) for c in CAPTIONS]
    torch.testing.assert_close(words[mask].norm(dim=-1), torch.ones(int(mask.sum())))
    assert torch.all(words[~mask] == 0)


def test_gru_ignores_padding_unless_reference_mode():
    model = AdaptModel(small_config()).eval()
    alone, _ = model.encode_text(["two dogs run"])
    padded, _ = model.encode_text(["two dogs run", "a red bus, parked near a tree"])
    torch.testing.assert_close(alone[0], padded[0, :3])
    reference = AdaptModel(small_config(reference_padding=True)).eval()
    reference.load_state_dict(model.state_dict())
    ref_alone, _ = reference.encode_text(["two dogs run"])
    ref_padded, _ = reference.encode_text(["two dogs run", "a red bus, parked near a tree"])
    assert not torch.allclose(ref_alone[0], ref_padded[0, :3])  # backward GRU reads padding


def test_gru_batch_without_padding_skips_packing_and_matches_the_packed_path():
    """Equal-length captions run the GRU unpacked: the same outputs and gradients as packing them."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    encoder = AdaptModel(small_config()).train().text_encoder
    batch = encoder.tokenize(["two dogs run", "a red bus", "the cat sits"])
    assert bool(batch.mask.all())
    fast = encoder(batch)
    embedded = torch.cat([encoder.frozen(batch.ids), encoder.trainable(batch.ids)], dim=-1)
    packed = pack_padded_sequence(embedded, batch.mask.sum(1), batch_first=True, enforce_sorted=False)
    output, _ = pad_packed_sequence(encoder.rnn(packed)[0], batch_first=True)
    slow = torch.nn.functional.normalize(output.view(3, 3, 2, -1).mean(dim=2), dim=-1)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(fast)
    params = [p for p in encoder.parameters() if p.requires_grad]
    fast_grads = torch.autograd.grad((fast * weights).sum(), params)
    slow_grads = torch.autograd.grad((slow * weights).sum(), params)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_words_and_empty_captions():
    model = AdaptModel(small_config())
    batch = model.tokenize(["a zebra"])
    assert batch.ids.tolist() == [[model.text_encoder.index["a"], 1]]
    with pytest.raises(ValueError, match="positions \\[1\\]"):
        model.tokenize(["a cat", "  "])


def test_glove_vectors_come_from_the_package_and_stay_frozen():
    vocab = build_vocab(["the cat", "qqqzzzunknownword"])
    vectors = WORD_VECTOR_SOURCES["glove-6b-50d"].load(vocab)
    assert vectors.shape == (len(vocab), 50)
    cat, the = vectors[vocab.index("cat")], vectors[vocab.index("the")]
    assert cat.abs().sum() > 0 and not torch.equal(cat, the)
    assert torch.all(vectors[vocab.index("qqqzzzunknownword")] == 0)
    model = AdaptModel(small_config(word_vectors="glove-6b-50d", vocab=vocab))
    torch.testing.assert_close(model.text_encoder.frozen.weight, vectors)


def test_gradients_reach_every_trainable_parameter_and_not_frozen_vectors():
    model = AdaptModel(small_config()).train()
    out = model(regions(4), CAPTIONS)
    HingeLoss()(out.scores).backward()
    assert model.text_encoder.frozen.weight.grad is None
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    model = AdaptModel(small_config(card={"note": "test"})).eval()
    model(regions(), CAPTIONS)  # nothing changes in eval mode
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["card"] == {"note": "test"}
    loaded = AdaptModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.score(regions(), CAPTIONS).scores,
                               model.score(regions(), CAPTIONS).scores, atol=0, rtol=0)


def make_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay out ``folder`` as huggingface_hub's cache would hold a downloaded model repo."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)


def test_loads_a_hub_repo_id_from_the_cache_offline(tmp_path):
    model = AdaptModel(small_config()).eval()
    model.save_pretrained(tmp_path / "saved")
    make_hub_cache(tmp_path / "cache", "someone/adapt-tiny", tmp_path / "saved")
    loaded = AdaptModel.from_pretrained("someone/adapt-tiny", cache_dir=tmp_path / "cache",
                                        local_files_only=True)
    torch.testing.assert_close(loaded.score(regions(), CAPTIONS).scores,
                               model.score(regions(), CAPTIONS).scores)
    # HF_HUB_OFFLINE=1 alone (no local_files_only) must be honoured, in a fresh interpreter.
    code = ("from adapt import AdaptModel; m = AdaptModel.from_pretrained('someone/adapt-tiny');"
            "print(m.config.latent_size)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("16")


def test_corrupt_weights_give_a_clear_error(tmp_path):
    AdaptModel(small_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        AdaptModel.from_pretrained(tmp_path)


def test_config_weights_mismatch_names_the_tensors(tmp_path):
    AdaptModel(small_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["latent_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="region_encoder.fc.weight: weights have shape"):
        AdaptModel.from_pretrained(tmp_path)


def test_missing_and_unknown_config_keys_are_named(tmp_path):
    AdaptModel(small_config(similarity="t2i")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["similarity"] = "ensemble"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing similarity.heads.i2t"):
        AdaptModel.from_pretrained(tmp_path)
    config["colour"] = "blue"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown config keys \\['colour'\\]"):
        AdaptModel.from_pretrained(tmp_path)


def test_configs_without_a_format_load_as_format_1_and_newer_formats_are_refused(tmp_path):
    AdaptModel(small_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == 1
    del config["format"]  # as every config.json written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert AdaptModel.from_pretrained(tmp_path).config.format == 1
    (tmp_path / "config.json").write_text(json.dumps({**config, "format": 2, "a_later_field": 0}))
    with pytest.raises(CheckpointError, match="format 2, newer than this adapt reads .format 1.: upgrade adapt"):
        AdaptModel.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="format=0 is not a config format"):
        small_config(format=0)


def test_folder_without_weights_is_refused(tmp_path):
    AdaptModel(small_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        AdaptModel.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def minilm_model():
    return AdaptModel(AdaptConfig(region_dim=12, latent_size=16, text_encoder="transformer"))


def test_transformer_encoder_runs_offline_and_is_saved_without_its_frozen_backbone(
    minilm_model, tmp_path
):
    model = minilm_model.eval()
    assert isinstance(model.text_encoder, TransformerTextEncoder)
    words, mask = model.encode_text(["a dog on a bench", "planes"])
    assert words.shape[:2] == mask.shape and words.shape[-1] == 16
    assert torch.all(words[~mask] == 0)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert not any(k.startswith("text_encoder.backbone") for k in load_file(tmp_path / "model.safetensors"))
    loaded = AdaptModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.score(regions(), CAPTIONS).scores,
                               model.score(regions(), CAPTIONS).scores)


@pytest.mark.parametrize("similarity", ["t2i", "i2t", "mean"])
def test_tiny_training_run_lifts_recall_far_above_chance(similarity):
    torch.manual_seed(0)
    train_x, train_caps = concept_data(512, seed=0)
    test_x, test_caps = concept_data(100, seed=1)
    config = AdaptConfig(region_dim=32, latent_size=64, similarity=similarity,
                         word_vectors="random", word_dim=32, vocab=build_vocab(train_caps))
    model = AdaptModel(config).train()
    loss_fn = HingeLoss()
    optimizer = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for epoch in range(6):
        order = torch.randperm(len(train_x))
        for batch in order.split(32):
            loss = loss_fn(model(train_x[batch], [train_caps[i] for i in batch]).scores)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    scores = model.score(test_x, test_caps).scores
    recall_at_1 = (scores.argmax(dim=0) == torch.arange(100)).float().mean().item()
    print(f"{similarity} R@1 = {recall_at_1:.2f}")
    assert recall_at_1 > 0.2, recall_at_1  # chance is 0.01
