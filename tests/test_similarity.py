"""ADAPT equations against direct, loop-based re-computations on random inputs."""

import os

import pytest
import torch
import torch.nn.functional as F

from adapt.layers import Adapt, Fovea
from torch.utils.checkpoint import checkpoint

from adapt.similarity import AdaptiveSimilarity, ImageToText, TextToImage

D, N_REGIONS = 16, 5


def random_inputs(n_images=4, lengths=(3, 7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = F.normalize(torch.randn(n_images, N_REGIONS, D, generator=g), dim=-1)
    words = F.normalize(torch.randn(len(lengths), max(lengths), D, generator=g), dim=-1)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return regions, words * mask[..., None], mask


def randomize(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def loop_adapt_fovea(values, query, adapt, smooth):
    """Paper eq.: gamma, beta = W q + b; A_bar = A * (gamma + 1) + beta; M = softmax_i(lambda A_bar)."""
    gamma = adapt.fc_gamma.weight @ query + adapt.fc_gamma.bias
    beta = adapt.fc_beta.weight @ query + adapt.fc_beta.bias
    adapted = torch.stack([v * (gamma + 1) + beta for v in values])
    mask = torch.zeros_like(adapted)
    for j in range(adapted.shape[1]):
        e = torch.exp(smooth * adapted[:, j] - (smooth * adapted[:, j]).max())
        mask[:, j] = e / e.sum()
    return adapted, mask


def loop_t2i(head, regions, words, mask):
    """Scores, each region's term of the score, and the caption's beta term (they sum to the score)."""
    images = head.norm(regions.transpose(1, 2)).transpose(1, 2)
    scores = torch.zeros(len(regions), len(words))
    attention = torch.zeros(len(regions), len(words), regions.shape[1])
    beta_terms = torch.zeros(len(regions), len(words))
    for c in range(len(words)):
        q = words[c][mask[c]].mean(0)
        beta = head.adapt.fc_beta.weight @ q + head.adapt.fc_beta.bias
        for i in range(len(regions)):
            adapted, m = loop_adapt_fovea(images[i], q, head.adapt, head.fovea.smooth)
            pooled = (adapted * m).mean(0)
            denominator = len(adapted) * pooled.norm() * q.norm()
            scores[i, c] = pooled @ q / (pooled.norm() * q.norm())
            # mean_i(A_i M_i) with A_i = B_i (gamma + 1) + beta: one term per region, and beta's.
            attention[i, c] = ((adapted - beta) * m) @ q / denominator
            beta_terms[i, c] = (beta * m).sum(0) @ q / denominator
    return scores, attention, beta_terms


def loop_i2t(head, regions, words, mask, masked=True):
    if masked:
        valid = words[mask]
        mean, var = valid.mean(0), valid.var(0, unbiased=False)
    else:
        flat = words.reshape(-1, D)
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
    normed = (words - mean) / torch.sqrt(var + head.norm.eps)
    scores = torch.zeros(len(regions), len(words))
    for i in range(len(regions)):
        q = regions[i].mean(0)
        for c in range(len(words)):
            n = int(mask[c].sum()) if masked else words.shape[1]
            adapted, m = loop_adapt_fovea(normed[c, :n], q, head.adapt, head.fovea.smooth)
            pooled = (adapted * m).max(0).values
            scores[i, c] = pooled @ q / (pooled.norm() * q.norm())
    return scores


def test_adapt_layer_is_film_with_gamma_plus_one():
    adapt = randomize(Adapt(D, D))
    values, query = torch.randn(2, N_REGIONS, D), torch.randn(2, D)
    expected = torch.stack([loop_adapt_fovea(values[b], query[b], adapt, 1.0)[0] for b in range(2)])
    torch.testing.assert_close(adapt(values, query), expected, atol=1e-5, rtol=1e-5)


def test_fovea_is_per_channel_softmax_over_locals_times_input():
    x = torch.randn(N_REGIONS, D)
    m = torch.zeros_like(x)
    for j in range(D):
        e = torch.exp(3.0 * x[:, j])
        m[:, j] = e / e.sum()
    torch.testing.assert_close(Fovea(3.0)(x), x * m, atol=1e-5, rtol=1e-5)


def test_fovea_gives_padded_locals_zero_weight():
    x = torch.randn(2, 4, D)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    mask = Fovea(5.0).mask(x, valid)
    assert torch.all(mask[0, 2:] == 0)
    torch.testing.assert_close(mask.sum(1), torch.ones(2, D))


@pytest.mark.parametrize("train_mode", [True, False])
def test_t2i_matches_loop(train_mode):
    head = randomize(TextToImage(D, smooth=10.0, normalization="batchnorm"))
    head.norm.running_mean.normal_()
    head.norm.running_var.uniform_(0.5, 2.0)
    head.train(train_mode)
    regions, words, mask = random_inputs()
    with torch.no_grad():
        scores, attention = head(regions, words, mask, return_attention=True)
        expected, expected_attention, beta_terms = loop_t2i(head, regions, words, mask)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention, expected_attention, atol=1e-5, rtol=1e-5)
    # The regions' terms and the caption's beta term add up to the score exactly.
    torch.testing.assert_close(attention.sum(-1) + beta_terms, scores, atol=1e-5, rtol=1e-5)
    # They depend on the caption: two captions light the regions differently.
    assert (attention[:, 0] - attention[:, 1]).abs().max() > 1e-2


def test_i2t_matches_loop_with_masked_padding():
    head = randomize(ImageToText(D, smooth=10.0, normalization="batchnorm")).train()
    regions, words, mask = random_inputs()
    with torch.no_grad():
        scores, attention = head(regions, words, mask, return_attention=True)
    torch.testing.assert_close(scores, loop_i2t(head, regions, words, mask), atol=1e-5, rtol=1e-5)
    assert torch.all(attention[:, 0, 3:] == 0)  # caption 0 has 3 tokens


def test_i2t_reference_padding_matches_unmasked_loop():
    head = randomize(ImageToText(D, 10.0, "batchnorm", reference_padding=True)).train()
    regions, words, mask = random_inputs()
    with torch.no_grad():
        scores, _ = head(regions, words, mask)
    torch.testing.assert_close(scores, loop_i2t(head, regions, words, mask, masked=False),
                               atol=1e-5, rtol=1e-5)


def test_reference_padding_truncates_to_34_tokens():
    head = randomize(ImageToText(D, 10.0, "batchnorm", reference_padding=True)).eval()
    regions, words, mask = random_inputs(lengths=(40, 20))
    changed = words.clone()
    changed[:, 34:] = 5.0
    with torch.no_grad():
        torch.testing.assert_close(head(regions, words, mask)[0], head(regions, changed, mask)[0])


def test_masking_changes_nothing_without_padding():
    regions, words, mask = random_inputs(lengths=(6, 6, 6))
    masked = randomize(ImageToText(D, 10.0, "batchnorm")).train()
    unmasked = ImageToText(D, 10.0, "batchnorm", reference_padding=True).train()
    unmasked.load_state_dict(masked.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(masked(regions, words, mask)[0], unmasked(regions, words, mask)[0])


def test_masking_matters_with_padding():
    regions, words, mask = random_inputs()
    masked = randomize(ImageToText(D, 10.0, "batchnorm")).train()
    unmasked = ImageToText(D, 10.0, "batchnorm", reference_padding=True).train()
    unmasked.load_state_dict(masked.state_dict())
    with torch.no_grad():
        assert not torch.allclose(masked(regions, words, mask)[0], unmasked(regions, words, mask)[0])


def test_ensemble_is_mean_of_both_directions():
    sim = randomize(AdaptiveSimilarity(("t2i", "i2t"), D, 10.0, 10.0, "batchnorm")).eval()
    regions, words, mask = random_inputs()
    with torch.no_grad():
        both = sim(regions, words, mask, return_attention=True)
        t2i = sim(regions, words, mask, directions=("t2i",)).scores
        i2t = sim(regions, words, mask, directions=("i2t",)).scores
        expected_t2i = loop_t2i(sim.heads["t2i"], regions, words, mask)[0]
    torch.testing.assert_close(both.scores, (t2i + i2t) / 2)
    torch.testing.assert_close(t2i, expected_t2i, atol=1e-5, rtol=1e-5)
    assert both.region_attention.shape == (4, 3, N_REGIONS)
    assert both.token_attention.shape == (4, 3, 7)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_chunked_equals_unchunked(direction):
    sim = randomize(AdaptiveSimilarity((direction,), D, 10.0, 10.0, "batchnorm")).eval()
    regions, words, mask = random_inputs(n_images=9, lengths=(2, 7, 5, 1, 3))
    with torch.no_grad():
        whole = sim(regions, words, mask, return_attention=True, memory_budget_mb=1024)
        tiny = sim(regions, words, mask, return_attention=True, memory_budget_mb=0.004)
    torch.testing.assert_close(whole.scores, tiny.scores)
    attention = "region_attention" if direction == "t2i" else "token_attention"
    torch.testing.assert_close(getattr(whole, attention), getattr(tiny, attention))


def test_chunked_gradients_equal_unchunked():
    sim = randomize(AdaptiveSimilarity(("t2i", "i2t"), D, 10.0, 10.0, "batchnorm")).train()
    regions, words, mask = random_inputs()
    grads = []
    for budget in (1024, 0.004):
        sim.zero_grad()
        sim(regions, words, mask, memory_budget_mb=budget).scores.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in sim.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unknown_direction_is_refused():
    sim = AdaptiveSimilarity(("t2i",), D, 10.0, 10.0, "none")
    regions, words, mask = random_inputs()
    with pytest.raises(ValueError, match="not available"):
        sim(regions, words, mask, directions=("i2t",))


@pytest.fixture
def plain_path(monkeypatch):
    """Run with the fused kernels switched off (ADAPT_FUSED=0), then restore them."""
    from adapt import fused

    monkeypatch.setenv("ADAPT_FUSED", "0")
    fused.kernels.cache_clear()
    yield
    monkeypatch.undo()
    fused.kernels.cache_clear()


@pytest.mark.parametrize("direction,reference", [("t2i", False), ("i2t", False), ("i2t", True)])
def test_fused_kernels_match_the_plain_path(direction, reference, plain_path):
    from adapt import fused

    sim = randomize(AdaptiveSimilarity((direction,), D, 10.0, 5.0, "batchnorm", reference)).eval()
    sim.heads[direction].norm.running_var.uniform_(0.5, 2.0)
    regions, words, mask = random_inputs(n_images=7, lengths=(2, 7, 5, 1, 3))
    with torch.no_grad():
        plain = sim(regions, words, mask).scores
    os.environ["ADAPT_FUSED"] = "1"
    fused.kernels.cache_clear()
    with torch.no_grad():
        assert fused.usable(regions)
        torch.testing.assert_close(sim(regions, words, mask).scores, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_checkpointed_blocks_give_the_unchunked_gradients_on_the_pytorch_path(direction, plain_path,
                                                                              monkeypatch):
    from adapt import similarity

    blocks = []

    def counted_checkpoint(block, *args, **kwargs):
        blocks.append(args)
        return checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(similarity, "checkpoint", counted_checkpoint)
    sim = randomize(AdaptiveSimilarity((direction,), D, 10.0, 10.0, "batchnorm")).train()
    regions, words, mask = random_inputs(n_images=6)
    grads = {}
    for budget in (1024, 0.004):
        blocks.clear()
        sim.zero_grad()
        inputs = [regions.clone().requires_grad_(), words.clone().requires_grad_()]
        scores = sim(*inputs, mask, memory_budget_mb=budget).scores
        assert len(blocks) == 1 if budget == 1024 else len(blocks) >= 9  # at most 2 pairs a block
        (scores.pow(2) * torch.arange(scores.numel()).reshape(scores.shape)).sum().backward()
        grads[budget] = [p.grad.clone() for p in sim.parameters()] + [x.grad for x in inputs]
    for whole, chunked in zip(grads[1024], grads[0.004], strict=True):
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)


def test_mean_pooled_baseline_is_cosine_of_means():
    sim = AdaptiveSimilarity(("mean",), D, 10.0, 10.0, "batchnorm")
    regions, words, mask = random_inputs()
    expected = torch.zeros(len(regions), len(words))
    for i in range(len(regions)):
        for c in range(len(words)):
            expected[i, c] = F.cosine_similarity(regions[i].mean(0), words[c][mask[c]].mean(0), dim=0)
    torch.testing.assert_close(sim(regions, words, mask).scores, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("own,asked", [(("i2t",), ("i2t", "mean")), (("t2i",), ("t2i", "mean")),
                                       (("t2i", "i2t"), ("mean", "i2t", "t2i"))])
def test_each_direction_files_its_own_attention_beside_the_baseline(own, asked):
    sim = randomize(AdaptiveSimilarity(own, D, 10.0, 10.0, "batchnorm")).eval()
    regions, words, mask = random_inputs()
    with torch.no_grad():
        out = sim(regions, words, mask, directions=asked, return_attention=True)
        alone = {d: sim(regions, words, mask, directions=(d,), return_attention=True) for d in own}
    if "i2t" in own:
        torch.testing.assert_close(out.token_attention, alone["i2t"].token_attention)
    if "t2i" in own:
        torch.testing.assert_close(out.region_attention, alone["t2i"].region_attention)
    else:
        assert out.region_attention is None
    if "i2t" not in own:
        assert out.token_attention is None
