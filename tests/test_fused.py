"""The fused T2I kernel under autograd: gradcheck of its backward, and training through it."""

import pytest
import torch
import torch.nn.functional as F

from adapt import AdaptConfig, AdaptModel, HingeLoss, build_vocab, fused
from adapt.similarity import AdaptiveSimilarity

pytestmark = pytest.mark.skipif(fused.kernels() is None, reason="fused kernels unavailable")

CAPTIONS = ["a cat sits on the mat", "two dogs run", "a red bus parked near a tree", "dogs",
            "a man rides a horse", "the sky"]


def t2i_inputs(n_images, n_regions, d, n_captions, dtype=torch.float64, seed=0):
    """Regions ``(M, R, D)``, scale (about half negative), shift and unit queries ``(C, D)``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, n_regions, d, generator=g, dtype=dtype)
    scale = torch.randn(n_captions, d, generator=g, dtype=dtype) * 0.8
    shift = torch.randn(n_captions, d, generator=g, dtype=dtype)
    query_unit = F.normalize(torch.randn(n_captions, d, generator=g, dtype=dtype), dim=-1)
    return images, scale, shift, query_unit


def direct_t2i(images, scale, shift, query_unit, smooth):
    """The T2I score written out: FiLM, fovea softmax over regions, mean, cosine."""
    adapted = images[None] * scale[:, None, None] + shift[:, None, None]  # (C, M, R, D)
    mask = torch.softmax(smooth * adapted, dim=2)
    pooled = (adapted * mask).mean(2)  # (C, M, D)
    return torch.einsum("cmd,cd->mc", F.normalize(pooled, dim=-1), query_unit)


@pytest.mark.parametrize("smooth", [10.0, 5.0])
@pytest.mark.parametrize("n_images,n_regions,d,n_captions",
                         [(3, 5, 7, 4), (2, 1, 3, 3), (1, 9, 16, 2), (4, 36, 5, 1)])
def test_gradcheck_in_double(n_images, n_regions, d, n_captions, smooth):
    inputs = [t.requires_grad_() for t in t2i_inputs(n_images, n_regions, d, n_captions)]
    assert (inputs[1] < 0).any() and (inputs[1] > 0).any()
    assert torch.autograd.gradcheck(lambda *x: fused.t2i_scores(*x, smooth), inputs)


def test_pairs_without_gradient_are_skipped_correctly():
    inputs = [t.requires_grad_() for t in t2i_inputs(3, 4, 6, 5)]
    keep = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) < 0.5
    assert torch.autograd.gradcheck(lambda *x: fused.t2i_scores(*x, 10.0) * keep, inputs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_forward_and_gradients_match_the_direct_formula(dtype, tol):
    inputs = [t.requires_grad_() for t in t2i_inputs(5, 36, 64, 7, dtype=dtype, seed=1)]
    weights = torch.randn(5, 7, generator=torch.Generator().manual_seed(3), dtype=dtype)
    scores = fused.t2i_scores(*inputs, 10.0)
    expected = direct_t2i(*inputs, 10.0)
    torch.testing.assert_close(scores, expected, atol=tol, rtol=tol)
    grads = torch.autograd.grad((scores * weights).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=tol * want.abs().max(), rtol=tol)


def test_only_t2i_is_usable_under_autograd():
    x = torch.zeros(2, 3)
    assert fused.usable(x, differentiable=True) and not fused.usable(x)
    with torch.no_grad():
        assert fused.usable(x) and fused.usable(x.double())
        assert not fused.usable(x, x.double()) and not fused.usable(x.half())


def test_mismatched_inputs_are_refused_clearly():
    images, scale, shift, query_unit = t2i_inputs(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="scale has dtype Float, expected Double"):
        fused.t2i_scores(images, scale.float(), shift, query_unit, 10.0)
    with pytest.raises(RuntimeError, match=r"shift has shape \[5, 3\], expected \[5, 4\]"):
        fused.t2i_scores(images, scale, shift[:, :3], query_unit, 10.0)


@pytest.fixture
def set_fused(monkeypatch):
    """``set_fused(on)`` switches the fused kernels on or off (ADAPT_FUSED); restored afterwards."""

    def switch(on: bool) -> None:
        monkeypatch.setenv("ADAPT_FUSED", "1" if on else "0")
        fused.kernels.cache_clear()

    yield switch
    monkeypatch.undo()
    fused.kernels.cache_clear()


def graph_has(node, name: str) -> bool:
    """Whether the autograd graph behind ``node`` holds a node of type ``name``."""
    seen, stack = set(), [node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == name:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def test_model_training_gradients_equal_the_plain_path(set_fused):
    config = AdaptConfig(region_dim=12, latent_size=32, similarity="t2i", word_vectors="random",
                         word_dim=8, vocab=build_vocab(CAPTIONS))
    torch.manual_seed(0)
    model = AdaptModel(config).train()
    features = torch.randn(len(CAPTIONS), 6, 12, generator=torch.Generator().manual_seed(1))
    results = {}
    for on in (True, False):
        set_fused(on)
        model.zero_grad()
        scores = model(features, CAPTIONS).scores
        assert graph_has(scores.grad_fn, "T2IScoresBackward") == on
        HingeLoss()(scores).backward()
        results[on] = scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}
    (fused_scores, fused_grads), (plain_scores, plain_grads) = results[True], results[False]
    torch.testing.assert_close(fused_scores, plain_scores, atol=1e-4, rtol=1e-4)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 5
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-4 * grad.abs().max(), rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_both_directions_match_the_plain_path_in_double(set_fused):
    torch.manual_seed(0)
    sim = AdaptiveSimilarity(("t2i", "i2t"), 16, 10.0, 5.0, "batchnorm").double().eval()
    g = torch.Generator().manual_seed(4)
    regions = torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None] < torch.tensor([6, 2, 4])[:, None]
    words = torch.randn(3, 6, 16, generator=g, dtype=torch.float64) * mask[..., None]
    scores = {}
    for on in (True, False):
        set_fused(on)
        with torch.no_grad():
            scores[on] = sim(regions, words, mask).scores
    torch.testing.assert_close(scores[True], scores[False], atol=1e-12, rtol=1e-12)


def test_i2t_left_padded_captions_skip_the_kernel_and_score_like_right_padded_ones(set_fused, monkeypatch):
    torch.manual_seed(0)
    sim = AdaptiveSimilarity(("i2t",), 16, 10.0, 5.0, "batchnorm").double().eval()
    g = torch.Generator().manual_seed(5)
    regions = torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    lengths = [6, 2, 4]
    right = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    words = torch.randn(3, 6, 16, generator=g, dtype=torch.float64) * right[..., None]
    # The same captions padded at the start: each row's real tokens move to its end.
    left = torch.stack([torch.roll(right[c], 6 - n) for c, n in enumerate(lengths)])
    left_words = torch.stack([torch.roll(words[c], 6 - n, dims=0) for c, n in enumerate(lengths)])
    kernel, calls = fused.i2t_scores, []
    monkeypatch.setattr(fused, "i2t_scores", lambda *args: calls.append(args) or kernel(*args))
    scores = {}
    for on in (True, False):
        set_fused(on)
        with torch.no_grad():
            scores[on] = sim(regions, left_words, left).scores
    assert calls == [], "the kernel reads the real tokens first: left padding must take the PyTorch path"
    torch.testing.assert_close(scores[True], scores[False], atol=1e-12, rtol=1e-12)
    set_fused(True)
    with torch.no_grad():
        right_padded = sim(regions, words, right).scores
    assert len(calls) == 1
    torch.testing.assert_close(scores[True], right_padded, atol=1e-12, rtol=1e-12)
