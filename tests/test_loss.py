"""The hinge loss against a direct re-computation, and its schedule state."""

import torch

from adapt.loss import HingeLoss


def loop_loss(scores, margin, k):
    scores, n = scores.tolist(), len(scores)
    summed, hardest = 0.0, 0.0
    for i in range(n):  # image i: its captions
        costs = [max(0.0, margin - scores[i][i] + scores[i][j]) for j in range(n) if j != i]
        summed, hardest = summed + sum(costs), hardest + max(costs)
    for j in range(n):  # caption j: its images
        costs = [max(0.0, margin - scores[j][j] + scores[i][j]) for i in range(n) if i != j]
        summed, hardest = summed + sum(costs), hardest + max(costs)
    return k * hardest + (1 - k) * summed


def test_loss_matches_loop_and_schedule_moves_from_sum_to_max():
    scores = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    loss = HingeLoss(margin=0.2, eta=0.991)
    for iteration in range(1, 4):
        k = 1 - 0.991**iteration  # the reference increments before computing k
        torch.testing.assert_close(loss(scores), torch.tensor(loop_loss(scores, 0.2, k)),
                                   atol=1e-5, rtol=1e-5)
    assert int(loss.iteration) == 3
    loss.iteration.fill_(10**6)
    torch.testing.assert_close(loss(scores), torch.tensor(loop_loss(scores, 0.2, 1.0)),
                               atol=1e-5, rtol=1e-5)


def test_iteration_counter_is_saved_and_restored():
    loss = HingeLoss()
    for _ in range(7):
        loss(torch.rand(3, 3))
    restored = HingeLoss()
    restored.load_state_dict(loss.state_dict())
    assert int(restored.iteration) == 7 and restored.k == loss.k


def test_perfectly_separated_scores_cost_nothing():
    assert HingeLoss()(torch.eye(4)).item() == 0.0
