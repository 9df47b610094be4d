"""The fused kernels: gradcheck of both backwards, training through them, and how they are built."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt import AdaptConfig, AdaptModel, HingeLoss, build_vocab, fused
from adapt.similarity import AdaptiveSimilarity

ROOT = Path(__file__).resolve().parents[1]


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or ``None`` when they can."""
    if fused.kernels() is not None:
        return None
    if os.environ.get("ADAPT_FUSED") == "0":
        return "the fused kernels are switched off (ADAPT_FUSED=0)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler to build the fused kernels (CXX or c++ on PATH)"
    return "the fused kernels failed to build (see the warning of adapt.fused)"


needs_kernels = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

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


def i2t_inputs(n_images, n_tokens, d, n_captions, lengths, dtype=torch.float64, seed=0):
    """Words ``(C, T, D)`` padded with zeros after ``lengths`` ``(C,)``, scale (about half
    negative), shift and unit queries ``(M, D)``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    valid = torch.arange(n_tokens)[None] < lengths[:, None]
    words = torch.randn(n_captions, n_tokens, d, generator=g, dtype=dtype) * valid[..., None]
    scale = torch.randn(n_images, d, generator=g, dtype=dtype) * 0.8
    shift = torch.randn(n_images, d, generator=g, dtype=dtype)
    query_unit = F.normalize(torch.randn(n_images, d, generator=g, dtype=dtype), dim=-1)
    return words, lengths, scale, shift, query_unit


def direct_i2t(words, lengths, scale, shift, query_unit, smooth):
    """The I2T score written out: FiLM, fovea softmax over the valid words, max, cosine."""
    valid = (torch.arange(words.shape[1])[None] < lengths[:, None])[None, :, :, None]
    adapted = words[None] * scale[:, None, None] + shift[:, None, None]  # (M, C, T, D)
    mask = torch.softmax((smooth * adapted).masked_fill(~valid, float("-inf")), dim=2)
    pooled = (adapted * mask).masked_fill(~valid, float("-inf")).amax(2)  # (M, C, D)
    return torch.einsum("mcd,md->mc", F.normalize(pooled, dim=-1), query_unit)


def direct_t2i(images, scale, shift, query_unit, smooth):
    """The T2I score written out: FiLM, fovea softmax over regions, mean, cosine."""
    adapted = images[None] * scale[:, None, None] + shift[:, None, None]  # (C, M, R, D)
    mask = torch.softmax(smooth * adapted, dim=2)
    pooled = (adapted * mask).mean(2)  # (C, M, D)
    return torch.einsum("cmd,cd->mc", F.normalize(pooled, dim=-1), query_unit)


@needs_kernels
@pytest.mark.parametrize("smooth", [10.0, 5.0])
@pytest.mark.parametrize("n_images,n_regions,d,n_captions",
                         [(3, 5, 7, 4), (2, 1, 3, 3), (1, 9, 16, 2), (4, 36, 5, 1)])
def test_t2i_gradcheck_in_double(n_images, n_regions, d, n_captions, smooth):
    inputs = [t.requires_grad_() for t in t2i_inputs(n_images, n_regions, d, n_captions)]
    assert (inputs[1] < 0).any() and (inputs[1] > 0).any()
    assert torch.autograd.gradcheck(lambda *x: fused.t2i_scores(*x, smooth), inputs)


@needs_kernels
@pytest.mark.parametrize("n_images,n_tokens,d,n_captions,lengths",
                         [(4, 5, 7, 3, (5, 2, 1)), (3, 1, 3, 2, (1, 1)), (2, 9, 16, 1, (9,)),
                          (1, 6, 5, 4, (6, 3, 4, 2))])
@pytest.mark.parametrize("smooth", [10.0, 1.0])
def test_i2t_gradcheck_in_double(n_images, n_tokens, d, n_captions, lengths, smooth):
    words, lengths, *rest = i2t_inputs(n_images, n_tokens, d, n_captions, lengths)
    inputs = [t.requires_grad_() for t in (words, *rest)]
    assert (inputs[1] < 0).any() and (inputs[1] > 0).any()
    assert torch.autograd.gradcheck(
        lambda w, *x: fused.i2t_scores(w, lengths, *x, smooth), inputs)


@needs_kernels
def test_pairs_without_gradient_are_skipped_correctly():
    t2i = [t.requires_grad_() for t in t2i_inputs(3, 4, 6, 5)]
    keep = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) < 0.5
    assert torch.autograd.gradcheck(lambda *x: fused.t2i_scores(*x, 10.0) * keep, t2i)
    words, lengths, *rest = i2t_inputs(3, 6, 5, 5, (6, 1, 3, 4, 2))
    i2t = [t.requires_grad_() for t in (words, *rest)]
    assert torch.autograd.gradcheck(lambda w, *x: fused.i2t_scores(w, lengths, *x, 10.0) * keep, i2t)


@needs_kernels
def test_i2t_padding_gets_no_gradient():
    words, lengths, *rest = i2t_inputs(3, 6, 5, 4, (6, 1, 3, 4))
    words.requires_grad_()
    fused.i2t_scores(words, lengths, *rest, 10.0).sum().backward()
    padding = torch.arange(6)[None] >= lengths[:, None]
    assert (words.grad[padding] == 0).all() and (words.grad[~padding] != 0).any(dim=-1).all()


def realistic_case(direction, dtype):
    """Inputs that require grad at realistic sizes (36 regions, up to 12 tokens, d = 64), with the
    fused and the direct score functions of ``direction`` over them."""
    if direction == "t2i":
        inputs = [t.requires_grad_() for t in t2i_inputs(5, 36, 64, 7, dtype=dtype, seed=1)]
        return inputs, lambda *x: fused.t2i_scores(*x, 10.0), lambda *x: direct_t2i(*x, 10.0)
    words, lengths, *rest = i2t_inputs(7, 12, 64, 5, (12, 6, 9, 1, 11), dtype=dtype, seed=1)
    inputs = [t.requires_grad_() for t in (words, *rest)]
    return (inputs, lambda w, *x: fused.i2t_scores(w, lengths, *x, 10.0),
            lambda w, *x: direct_i2t(w, lengths, *x, 10.0))


@needs_kernels
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_forward_and_gradients_match_the_direct_formula(direction, dtype, tol):
    inputs, fused_scores, direct_scores = realistic_case(direction, dtype)
    scores, expected = fused_scores(*inputs), direct_scores(*inputs)
    torch.testing.assert_close(scores, expected, atol=tol, rtol=tol)
    weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    grads = torch.autograd.grad((scores * weights).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=tol * want.abs().max(), rtol=tol)


@needs_kernels
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_float_kernels_match_double_with_exponents_below_float_range(direction):
    """The float kernels' inline exp against the double formula, with a fovea so sharp that many
    exponents fall below -87 (where float exp denormalises and the kernel's stops)."""
    inputs, fused_scores, direct_scores = realistic_case(direction, torch.float64)
    with torch.no_grad():
        inputs[1].mul_(4.0)  # scale: exponents lambda * s * x reach about -300
    expected = direct_scores(*inputs)
    singles = [t.detach().float().requires_grad_() for t in inputs]
    scores = fused_scores(*singles)
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((scores * weights.float()).sum(), singles)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max(), rtol=1e-4)


@needs_kernels
def test_usable_for_cpu_tensors_of_one_float_dtype_with_or_without_autograd():
    x = torch.zeros(2, 3)
    assert fused.usable(x) and fused.usable(x.double()) and fused.usable(x.requires_grad_())
    with torch.no_grad():
        assert fused.usable(x)
    assert not fused.usable(x, x.double()) and not fused.usable(x.half())


@needs_kernels
def test_mismatched_inputs_are_refused_clearly():
    images, scale, shift, query_unit = t2i_inputs(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="scale has dtype Float, expected Double"):
        fused.t2i_scores(images, scale.float(), shift, query_unit, 10.0)
    with pytest.raises(RuntimeError, match=r"shift has shape \[5, 3\], expected \[5, 4\]"):
        fused.t2i_scores(images, scale, shift[:, :3], query_unit, 10.0)
    words, lengths, scale, shift, query_unit = i2t_inputs(2, 3, 4, 2, (3, 1))
    with pytest.raises(RuntimeError, match="caption 1 has length 4, expected 1 to 3"):
        fused.i2t_scores(words, torch.tensor([3, 4]), scale, shift, query_unit, 10.0)
    with pytest.raises(RuntimeError, match="query_unit has shape \\[2, 3\\], expected \\[2, 4\\]"):
        fused.i2t_scores(words, lengths, scale, shift, query_unit[:, :3], 10.0)


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


@needs_kernels
@pytest.mark.parametrize("similarity,kernels", [("t2i", ["T2IScoresBackward"]),
                                                ("i2t", ["I2TScoresBackward"]),
                                                ("ensemble", ["T2IScoresBackward", "I2TScoresBackward"])])
def test_model_training_gradients_equal_the_plain_path(set_fused, similarity, kernels):
    config = AdaptConfig(region_dim=12, latent_size=32, similarity=similarity, word_vectors="random",
                         word_dim=8, vocab=build_vocab(CAPTIONS))
    torch.manual_seed(0)
    model = AdaptModel(config).train()
    features = torch.randn(len(CAPTIONS), 6, 12, generator=torch.Generator().manual_seed(1))
    results = {}
    for on in (True, False):
        set_fused(on)
        model.zero_grad()
        scores = model(features, CAPTIONS).scores
        assert all(graph_has(scores.grad_fn, kernel) == on for kernel in kernels)
        HingeLoss()(scores).backward()
        results[on] = scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}
    (fused_scores, fused_grads), (plain_scores, plain_grads) = results[True], results[False]
    torch.testing.assert_close(fused_scores, plain_scores, atol=1e-4, rtol=1e-4)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 5
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-4 * grad.abs().max(), rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
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


@needs_kernels
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


# -- building ------------------------------------------------------------------------------------

def ensemble_scores() -> torch.Tensor:
    """``(5, 3)`` training-mode scores of a small double-precision T2I + I2T similarity."""
    torch.manual_seed(0)
    sim = AdaptiveSimilarity(("t2i", "i2t"), 16, 10.0, 5.0, "batchnorm").double().train()
    g = torch.Generator().manual_seed(4)
    regions = torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None] < torch.tensor([6, 2, 4])[:, None]
    words = torch.randn(3, 6, 16, generator=g, dtype=torch.float64) * mask[..., None]
    return sim(regions, words, mask).scores.detach()


def test_a_failed_build_warns_and_scores_like_the_pytorch_path(tmp_path, set_fused):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "ADAPT_FUSED": "1",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "PYTHONPATH": str(ROOT)}
    script = ("import json; from adapt import fused; from tests.test_fused import ensemble_scores; "
              "print(json.dumps([fused.kernels() is not None, ensemble_scores().tolist()]))")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600, check=True)
    assert "adapt: building the fused CPU kernels, about a minute, once" in out.stderr
    assert "adapt: fused CPU kernels unavailable" in out.stderr and "using the PyTorch path" in out.stderr
    built, scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert built is False
    set_fused(False)
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), ensemble_scores(),
                               atol=1e-12, rtol=1e-12)
    set_fused(True)
    if fused.kernels() is not None:  # and like the kernels where they build
        torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), ensemble_scores(),
                                   atol=1e-10, rtol=1e-10)


def test_the_build_folder_is_keyed_by_the_instruction_set_and_the_compiler(monkeypatch):
    monkeypatch.delenv("ADAPT_FUSED_MARCH", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    avx2 = fused.build_directory()
    assert {"-mavx2", "-mfma"} <= set(fused.compile_flags()) and not any("-march" in f for f in fused.compile_flags())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    baseline = fused.build_directory()
    assert baseline != avx2 and "-mavx2" not in fused.compile_flags()
    # The same instruction set on another CPU model shares the build: a portable cache.
    monkeypatch.setattr(fused, "cpu_instruction_set", lambda: "x86_64: sse2")
    assert fused.build_directory() == baseline
    # -march=native is tied to this CPU's features.
    monkeypatch.setenv("ADAPT_FUSED_MARCH", "native")
    native = fused.build_directory()
    monkeypatch.setattr(fused, "cpu_instruction_set", lambda: "x86_64: sse2 avx2")
    assert "-march=native" in fused.compile_flags() and fused.build_directory() not in (native, baseline, avx2)
    monkeypatch.setenv("CXX", "clang++")
    assert fused.build_directory() != native and fused.build_directory().parent == avx2.parent


def test_loading_leaves_torch_loggers_as_they_were():
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level, filters = torch_logger.level, list(torch_logger.filters)
    fused.kernels()
    fused.build_directory()
    assert torch_logger.level == level and torch_logger.filters == filters


@needs_kernels
def test_warm_up_loads_and_runs_the_kernels_in_the_background(set_fused, capsys):
    from adapt import build_kernels

    set_fused(True)
    thread = fused.warm_up()
    thread.join(timeout=600)
    assert not thread.is_alive() and fused.kernels() is not None
    assert build_kernels.main([]) == 0
    assert str(fused.build_directory()) in capsys.readouterr().out
