"""M2N2's moves on crafted cases, computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evoopt.search.m2n2 import attraction, competition_fitness, crossover, pick_parents, replaced, slerp_angle

# three members, three examples: member 2 alone solves example 2
S = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])


def test_competition_fitness_shares_each_example_among_its_solvers() -> None:
    # z = [2, 1, 1]; F = [[1/2, 1, 0], [1/2, 0, 0], [0, 0, 1]]
    assert competition_fitness(S).tolist() == [1.5, 0.5, 1.0]
    assert competition_fitness(S, alpha=0.0).tolist() == [2.0, 1.0, 1.0]  # plain accuracy counts
    # an example nobody solves divides by 1: nothing to share, nothing broken
    assert competition_fitness(np.array([[1, 0], [0, 0]])).tolist() == [1.0, 0.0]


def test_attraction_pulls_towards_strength_where_the_first_parent_is_weak() -> None:
    # A = member 1 ([1, 0, 0]): member 0 adds example 1 (1 / z = 1), member 2 adds example 2 (1 / 1)
    assert attraction(S, 1).tolist() == [1.0, 0.0, 1.0]
    # A = member 0 ([1, 1, 0]): only member 2 adds anything
    assert attraction(S, 0).tolist() == [0.0, 0.0, 1.0]


def test_parents_are_drawn_by_fitness_then_attraction() -> None:
    rng = np.random.default_rng(0)
    pairs = [pick_parents(S, rng) for _ in range(3000)]
    firsts = np.bincount([a for a, _ in pairs], minlength=3) / 3000
    np.testing.assert_allclose(firsts, [1.5 / 3, 0.5 / 3, 1.0 / 3], atol=0.03)  # f / sum f
    assert all(b == 2 for a, b in pairs if a == 0)  # only member 2 complements member 0
    assert all(a != b for a, b in pairs)
    # a first parent at least as good as everyone everywhere: the second by fitness among the others
    dominant = np.array([[1, 1], [1, 0], [0, 0]])
    assert {pick_parents(dominant, np.random.default_rng(s))[1] for s in range(50) if
            pick_parents(dominant, np.random.default_rng(s))[0] == 0} <= {1, 2}
    same = pick_parents(S, np.random.default_rng(5), attract=False)
    assert all(0 <= p < 3 for p in same)


def test_the_child_replaces_the_least_fit_when_it_is_not_the_least_fit_itself() -> None:
    # child [0, 1, 1]: z = [2, 2, 2]; fitness 1, 0.5, 0.5 and the child 1: member 1 (first of the ties) goes
    assert replaced(S, np.array([0, 1, 1])) == 1
    # child [1, 0, 0] duplicates member 1: z = [3, 1, 1]; fitness 4/3, 1/3, 1, child 1/3: a tie goes to the child
    assert replaced(S, np.array([1, 0, 0])) == 1
    # child solves nothing: fitness 0 < every member's
    assert replaced(S, np.array([0, 0, 0])) is None


def test_crossover_at_a_split_by_hand() -> None:
    a, b = torch.zeros(4), torch.ones(4)
    # split 2, w = 0.25: v = [.25, .25, .75, .75]; linear: (1 - v) a + v b = v
    torch.testing.assert_close(crossover(a, b, offset=0, split=2, ratio=0.25, linear=True),
                               torch.tensor([0.25, 0.25, 0.75, 0.75]))
    # orthogonal unit parents, Omega = pi / 2, v = 1/2 everywhere: sin(pi/4) (a + b)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    omega = slerp_angle([a], [b])
    assert omega == pytest.approx(math.pi / 2)
    torch.testing.assert_close(crossover(a, b, offset=0, split=1, ratio=0.5, omega=omega),
                               torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # v = 0 before the split returns a there (w = 0), v = 1 after it returns b
    torch.testing.assert_close(crossover(a, b, offset=0, split=1, ratio=0.0, omega=omega), torch.tensor([1.0, 1.0]))


def test_crossover_tensor_by_tensor_equals_the_flat_parameter_vector() -> None:
    g = torch.Generator().manual_seed(0)
    first = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    second = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    omega = slerp_angle(first, second)
    flat_a = torch.cat([t.flatten() for t in first])
    flat_b = torch.cat([t.flatten() for t in second])
    assert omega == pytest.approx(slerp_angle([flat_a], [flat_b]))
    whole = crossover(flat_a, flat_b, offset=0, split=4, ratio=0.3, omega=omega)
    parts = [crossover(first[0], second[0], offset=0, split=4, ratio=0.3, omega=omega),
             crossover(first[1], second[1], offset=3, split=4, ratio=0.3, omega=omega)]
    torch.testing.assert_close(torch.cat([p.flatten() for p in parts]), whole)
