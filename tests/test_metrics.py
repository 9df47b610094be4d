"""Retrieval metrics against a hand-computed example, the reference's loops, and COCO folds."""

import numpy as np
import pytest
import torch

from training.metrics import (
    fold_slices,
    image_to_text_ranks,
    markdown_table,
    mean_metrics,
    retrieval_metrics,
    summarize_ranks,
    text_to_image_ranks,
)

# 3 images x 5 captions: captions 0-4 describe image 0, 5-9 image 1, 10-14 image 2.
HAND = torch.tensor([
    [0.1, 0.9, 0.2, 0.3, 0.1, 0.0, 0.0, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.0, 0.0, 0.0, 0.0, 0.2, 0.2, 0.1, 0.3, 0.5, 0.0, 0.0, 0.6, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 0.7, 0.7, 0.0, 0.0],
])


def test_hand_computed_ranks_with_ties():
    # Image 0: best own caption 0.9; caption 7 (image 1's) beats it -> rank 1.
    # Image 1: best own 0.5 (caption 9); caption 0 ties it and caption 12 beats it -> rank 2.
    # Image 2: best own 0.8, nothing else reaches it -> rank 0.
    assert image_to_text_ranks(HAND, 5).tolist() == [1, 2, 0]
    # Caption 0: own image 0.1 < image 1's 0.5 -> 1. Caption 7: image 0 scores 0.95 -> 1.
    # Captions 13, 14: all three images score 0.0, both ties count against -> 2.
    assert text_to_image_ranks(HAND, 5).tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2, 2]


def test_hand_computed_metrics():
    m = retrieval_metrics(HAND, 5)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert (m["i2t_r5"], m["i2t_r10"], m["i2t_medr"], m["i2t_meanr"]) == (100.0, 100.0, 2.0, 2.0)
    assert m["t2i_r1"] == pytest.approx(100 * 11 / 15)
    assert (m["t2i_r5"], m["t2i_r10"], m["t2i_medr"]) == (100.0, 100.0, 1.0)
    assert m["t2i_meanr"] == pytest.approx(1 + 6 / 15)
    assert m["rsum"] == pytest.approx(100 / 3 + 200 + 100 * 11 / 15 + 200)


def test_summarize_matches_reference_median_rule():
    # medr = floor(median(0-based ranks)) + 1; an even count averages the middle two first.
    assert summarize_ranks(np.array([0, 1, 4, 9]))["medr"] == 3.0
    assert summarize_ranks(np.array([0, 1, 4, 9]))["r5"] == 75.0


def test_constant_and_nan_scores_are_not_rewarded():
    constant = torch.zeros(4, 20)
    m = retrieval_metrics(constant, 5)
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0  # ties count against the model
    nan = torch.full((12, 60), float("nan"))  # every right candidate ranks last of 12 or of 60
    assert retrieval_metrics(nan, 5)["rsum"] == 0.0


def reference_i2t(sims, k):
    """The reference's loop (retrieval/train/evaluation.py, i2t): argsort, best own caption."""
    ranks = []
    for index in range(sims.shape[0]):
        inds = np.argsort(sims[index])[::-1]
        ranks.append(min(np.where(inds == i)[0][0] for i in range(k * index, k * index + k)))
    return np.array(ranks)


def reference_t2i(sims, k):
    ranks = np.zeros(sims.shape[1])
    for c in range(sims.shape[1]):
        inds = np.argsort(sims[:, c])[::-1]
        ranks[c] = np.where(inds == c // k)[0][0]
    return ranks


@pytest.mark.parametrize("k", [5, 1, 2])
def test_matches_reference_loops_without_ties(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(37, 37 * k, generator=g, dtype=torch.float64)
    assert image_to_text_ranks(scores, k).tolist() == reference_i2t(scores.numpy(), k).tolist()
    assert text_to_image_ranks(scores, k).tolist() == reference_t2i(scores.numpy(), k).tolist()


def test_blocks_do_not_change_ranks(monkeypatch):
    import training.metrics as metrics

    scores = torch.randn(30, 150, generator=torch.Generator().manual_seed(0))
    whole = retrieval_metrics(scores)
    monkeypatch.setattr(metrics, "_BLOCK", 7)
    assert retrieval_metrics(scores) == whole


def test_shape_errors():
    with pytest.raises(ValueError, match="5 captions per image"):
        retrieval_metrics(torch.zeros(3, 14), 5)
    with pytest.raises(ValueError, match="score matrix"):
        retrieval_metrics(torch.zeros(15), 5)


def test_coco_five_folds():
    folds = fold_slices(5000, 5)
    assert [(i.start, i.stop, c.start, c.stop) for i, c in folds] == [
        (k * 1000, (k + 1) * 1000, k * 5000, (k + 1) * 5000) for k in range(5)]
    assert fold_slices(10, 1) == [(slice(0, 10), slice(0, 50))]
    with pytest.raises(ValueError, match="equal folds"):
        fold_slices(5001, 5)


def test_fold_mean_and_table():
    scores = torch.randn(10, 50, generator=torch.Generator().manual_seed(1))
    per_fold = [retrieval_metrics(scores[i, c]) for i, c in fold_slices(10, 2)]
    mean = mean_metrics(per_fold)
    assert mean["rsum"] == pytest.approx((per_fold[0]["rsum"] + per_fold[1]["rsum"]) / 2)
    table = markdown_table({"1K": mean})
    assert table.count("\n") == 2 and f"{mean['rsum']:.1f}" in table
