"""Evolver's offspring: the paper's mutation and crossover, by hand, and their determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evoopt.evolver import STRATEGIES, Move, draw_move, mutant, offspring_tensor

# three individuals' copies of one tensor
X = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([2.0, 4.0, 6.0, 8.0])]


def test_paper_mutation_by_hand() -> None:
    move = Move("paper", target=0, donors=(0, 1, 2), f=0.5, cr=1.0, seed=0)
    # v = x0 + 0.5 (x1 - x2) = [1,2,3,4] + 0.5 [-2,-4,-6,-8] = [0,0,0,0]
    assert torch.equal(mutant(move, X), torch.zeros(4))
    assert torch.equal(offspring_tensor(move, X, 0), torch.zeros(4))  # Cr = 1: all from the mutant


def test_released_code_mutation_by_hand() -> None:
    move = Move("released", target=1, donors=(2,), f=0.5, cr=1.0, seed=0)
    # v = x1 + 0.5 (x2 - x1) = 0.5 x2 = [1,2,3,4]
    assert torch.equal(mutant(move, X), torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_crossover_takes_cr_of_the_elements_and_is_rebuilt_exactly() -> None:
    big = [torch.randn(200, 100, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    move = Move("paper", target=0, donors=(0, 1, 2), f=0.5, cr=0.3, seed=7)
    child = offspring_tensor(move, big, index=4)
    from_mutant = torch.isclose(child, mutant(move, big)) & ~torch.isclose(child, big[0])
    assert 0.28 < from_mutant.float().mean() < 0.32
    assert torch.equal(child[~from_mutant], big[0][~from_mutant])  # the rest is the target's
    assert torch.equal(child, offspring_tensor(move, big, index=4))  # same move and tensor: same child
    assert not torch.equal(child, offspring_tensor(move, big, index=5))  # another tensor: another mask
    assert torch.equal(offspring_tensor(Move("paper", 0, (0, 1, 2), 0.5, 0.0, 7), big, 4), big[0])  # Cr = 0
    half = [t.to(torch.bfloat16) for t in big]
    assert offspring_tensor(move, half, 4).dtype == torch.bfloat16


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_donors_are_distinct_from_each_other_and_the_target(strategy: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        target = int(rng.integers(5))
        move = draw_move(rng, strategy, target=target, size=5, best=2)
        others = move.donors[1:] if strategy in ("paper", "best1") else move.donors
        assert target not in others and len(set(others)) == len(others)
        if strategy == "paper":
            assert move.donors[0] == target
        if strategy == "best1":
            assert move.donors[0] == 2 and 2 not in others
    with pytest.raises(ValueError, match="needs 4 distinct"):
        draw_move(rng, "rand1", target=0, size=3, best=0)


def test_released_reference_is_random_early_and_best_late() -> None:
    """P(random other) = 0.5 / (G - g) + 0.5: 0.5 + 0.5/10 at g = 0 of 10, 1 at the last generation."""
    rng = np.random.default_rng(0)
    early = [draw_move(rng, "released", target=0, size=6, best=5, generation=0, generations=10).donors[0]
             for _ in range(4000)]
    # best (5) is picked as the best other with p = 0.45, and as a random other with p = 0.55 / 5
    assert abs(np.mean(np.array(early) == 5) - (0.45 + 0.55 / 5)) < 0.03
    late = [draw_move(rng, "released", target=0, size=6, best=5, generation=9, generations=10).donors[0]
            for _ in range(2000)]
    assert abs(np.mean(np.array(late) == 5) - 1 / 5) < 0.03
