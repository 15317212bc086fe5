"""Evolver's offspring: the paper's mutation and crossover, by hand, and their determinism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState

from evoopt.search.evolver import ATTR, STRATEGIES, Move, draw_move, mutant, offspring_tensor, replay
from tests.helpers.evolver import GENERATIONS, in_process, population_after

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
    into = torch.empty(200, 100)
    assert offspring_tensor(move, big, 4, out=into) is into and torch.equal(into, child)  # written in place
    small = offspring_tensor(move, big, 4, chunk=999)  # chunks of another size: other draws, same rules
    kept = torch.isclose(small, big[0])
    assert torch.equal(small, offspring_tensor(move, big, 4, chunk=999)) and 0.65 < kept.float().mean() < 0.75
    with pytest.raises(ValueError, match=r"out: a contiguous tensor of shape \(200, 100\)"):
        offspring_tensor(move, big, 4, out=torch.empty(100, 200))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_donors_are_distinct_from_each_other_and_the_target(strategy: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        target = int(rng.integers(5))
        move = draw_move(rng, strategy, target=target, size=5, best=2, best_other=3 if target == 2 else 2)
        others = move.donors[1:] if strategy in ("paper", "best1") else move.donors
        assert target not in others and len(set(others)) == len(others)
        if strategy == "paper":
            assert move.donors[0] == target
        if strategy == "best1":
            assert move.donors[0] == 2 and 2 not in others
    with pytest.raises(ValueError, match="needs 4 distinct"):
        draw_move(rng, "rand1", target=0, size=3, best=0)


def test_released_reference_is_often_the_best_early_and_random_late() -> None:
    """P(random other) = 0.5 / (G - g) + 0.5: 0.5 + 0.5/10 at g = 0 of 10, 1 at the last generation."""
    rng = np.random.default_rng(0)
    early = [draw_move(rng, "released", target=0, size=6, best=5, generation=0, generations=10).donors[0]
             for _ in range(4000)]
    # best (5) is picked as the best other with p = 0.45, and as a random other with p = 0.55 / 5
    assert abs(np.mean(np.array(early) == 5) - (0.45 + 0.55 / 5)) < 0.03
    late = [draw_move(rng, "released", target=0, size=6, best=5, generation=9, generations=10).donors[0]
            for _ in range(2000)]
    assert abs(np.mean(np.array(late) == 5) - 1 / 5) < 0.03
    # merge-integrated (the individuals have no scores): always a random other, as the authors' code with a merger
    unscored = [draw_move(rng, "released", target=0, size=6, best=5, generation=0, generations=10,
                          scored=False).donors[0] for _ in range(4000)]
    assert abs(np.mean(np.array(unscored) == 5) - 1 / 5) < 0.03
    # the target is the fittest: the reference is the best of the others (4), as the authors' code has it
    # (find_max_index_after_removing_idx), with p = 0.45 + 0.55 / 5; a random other would give 4 with p = 1 / 5
    fittest = [draw_move(rng, "released", target=5, size=6, best=5, best_other=4, generation=0,
                         generations=10).donors[0] for _ in range(4000)]
    assert abs(np.mean(np.array(fittest) == 4) - (0.45 + 0.55 / 5)) < 0.03
    with pytest.raises(ValueError, match="best_other: the fittest individual other than the target"):
        draw_move(rng, "released", target=5, size=6, best=5)


def test_released_reference_of_the_fittest_follows_the_study_direction() -> None:
    """Minimising, individual 1 is the fittest and 3 the best of the others; offspring never win, so the
    population stays. Every offspring of 1 takes as reference what draw_move gives with best_other 3."""
    from evoopt.search.evolver import EvolverSampler, History

    history = History(1, [0.4, 0.1, 0.3, 0.2], [0.5] * 4, [0.5] * 4, [[]], set(), maximize=False)
    assert (history.best, history.fittest(exclude=1), history.fittest(exclude=2)) == (1, 3, 1)
    history.maximize = True
    assert (history.best, history.fittest(exclude=0), history.fittest(exclude=3)) == (0, 2, 0)

    def objective(trial: optuna.Trial) -> float:
        target = trial.suggest_int("target", 0, 3)
        if trial.study._storage.get_trial_system_attrs(trial._trial_id)[ATTR]["generation"] == 0:
            return [0.4, 0.1, 0.3, 0.2][target]
        for name in ("F", "Cr"):
            trial.suggest_float(name, 0.0, 2.0)
        trial.suggest_int("seed", 0, 2**31 - 1)
        trial.suggest_int("donor_1", 0, 3)
        return 1.0

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="minimize", sampler=EvolverSampler(
        population=4, strategy="released", generations=20, seed=0, poll=0.01, wait_timeout=2))
    study.optimize(objective, n_trials=4 + 4 * 12)
    drawn = [(t.system_attrs[ATTR]["generation"], t.params["donor_1"]) for t in study.trials
             if t.params["target"] == 1 and "donor_1" in t.params]
    expected = [draw_move(np.random.default_rng([0, g, 1]), "released", target=1, size=4, best=1, best_other=3,
                          generation=g - 1, generations=20).donors[0] for g, _ in drawn]
    assert len(drawn) == 12 and [d for _, d in drawn] == expected
    assert sum(d == 3 for d in expected) > 6  # mostly the best other (a random other: 1 in 3)


# --- replay: the population's history from trials, by hand ----------------------------------------------

def _trial(number: int, generation: int, slot: int, value: float | None, state: Any = None, rule: bool = False,
           **params: Any) -> FrozenTrial:
    from optuna.distributions import FloatDistribution, IntDistribution

    dists = {k: IntDistribution(0, 2**31 - 1) if k != "F" and k != "Cr" else FloatDistribution(0, 2) for k in params}
    state = TrialState.COMPLETE if state is None else state  # (RUNNING is 0: falsy)
    finished = state in (TrialState.COMPLETE, TrialState.PRUNED)
    trial = optuna.trial.create_trial(state=state, value=value if finished else None, params=params,
                                      distributions=dists,
                                      system_attrs={ATTR: {"generation": generation, "target": slot,
                                                           "strategy": "paper", **({"rule": 2} if rule else {})}})
    trial.number = number
    return trial


def _move(target: int, seed: int, f: float = 0.5) -> dict[str, Any]:
    return {"target": target, "donor_1": target, "donor_2": (target + 1) % 3, "donor_3": (target + 2) % 3,
            "F": f, "Cr": 0.5, "seed": seed}


def test_replay_selects_greedily_per_generation_by_hand() -> None:
    trials = [_trial(0, 0, 0, 0.6, target=0), _trial(1, 0, 1, 0.8, target=1), _trial(2, 0, 2, 0.7, target=2),
              # generation 1: offspring of 0 beats 0.6, of 1 ties 0.8 (the parent stays), of 2 loses
              _trial(3, 1, 0, 0.65, **_move(0, 11, f=0.9)), _trial(4, 1, 1, 0.8, **_move(1, 12)),
              _trial(5, 1, 2, 0.5, **_move(2, 13)),
              # generation 2: target 1 done, target 0 failed (its slot is free again), target 2 running
              _trial(6, 2, 1, 0.9, **_move(1, 14)), _trial(7, 2, 0, None, TrialState.FAIL, **_move(0, 15)),
              _trial(8, 2, 2, None, TrialState.RUNNING, **_move(2, 16))]
    history = replay(trials, size=3, integrated=False, maximize=True, f=0.5, cr=0.5)
    assert history.generation == 2  # generation 2 is not finished: its selection has not happened
    assert history.fitness == [0.65, 0.8, 0.7]
    assert history.f == [0.9, 0.5, 0.5]  # the winner's F is its individual's now (jDE reads it)
    assert [[m.target for m in moves] for moves in history.accepted] == [[], [0]]
    assert history.accepted[1][0].seed == 11
    assert history.taken == {1, 2} and history.best == 1
    # minimising, the same trials select the other way
    low = replay(trials[:6], size=3, integrated=False, maximize=False, f=0.5, cr=0.5)
    assert low.fitness == [0.6, 0.8, 0.5] and low.best == 2
    # merge-integrated: generation 0 is one trial, every individual's fitness is that merge's score
    merged = replay([_trial(0, 0, 0, 0.7, target=0)], size=3, integrated=True, maximize=True, f=0.5, cr=0.5)
    assert merged.generation == 1 and merged.fitness == [0.7, 0.7, 0.7] and merged.taken == set()


def test_replay_follows_the_paired_rule_where_a_trial_recorded_it() -> None:
    """``selection: paired``: an offspring that scored higher but was not found better stays out; one whose
    paired test accepted it goes in. The holders are the trials whose outcomes the next generation compares."""
    trials = [_trial(0, 0, 0, 0.6, target=0), _trial(1, 0, 1, 0.8, target=1), _trial(2, 0, 2, 0.7, target=2),
              _trial(3, 1, 0, 0.65, **_move(0, 11)), _trial(4, 1, 1, 0.81, **_move(1, 12)),
              _trial(5, 1, 2, 0.5, TrialState.PRUNED, **_move(2, 13))]
    trials[3].user_attrs["selection"] = {"decided": "accepted"}
    trials[4].user_attrs["selection"] = {"decided": "rejected"}  # higher, but not significantly
    trials[5].user_attrs["selection"] = {"decided": "rejected"}  # stopped early: worse
    history = replay(trials, size=3, integrated=False, maximize=True, f=0.5, cr=0.5)
    assert history.fitness == [0.65, 0.8, 0.7] and history.holders == [3, 1, 2]
    assert [[m.target for m in moves] for moves in history.accepted] == [[], [0]]
    merged = replay([_trial(0, 0, 0, 0.7, target=0)], size=3, integrated=True, maximize=True, f=0.5, cr=0.5)
    assert merged.holders == [0, 0, 0]  # X_Evolver: every individual is judged by the merge's trial


def test_integrated_replay_keeps_one_score_the_merge_of_the_population_by_hand() -> None:
    """X_Evolver: every offspring is compared with X(P), the one score of the population. One winner: P takes it
    and X(P) is its score. Several: slot N scores them together, and P takes them all if that beats the best
    alone, else the best alone. The old rule compared an offspring with its target's last winning score: after
    generation 1 below, offspring 2 of generation 2 (0.82) beat its target (0.6) but not X(P) (0.85)."""
    from evoopt.errors import ConfigError

    def merged(*trials: FrozenTrial, maximize: bool = True) -> Any:
        return replay(trials, size=3, integrated=True, maximize=maximize, f=0.5, cr=0.5)

    first = [_trial(0, 0, 0, 0.7, rule=True, target=0),
             _trial(1, 1, 0, 0.75, rule=True, **_move(0, 11)), _trial(2, 1, 1, 0.8, rule=True, **_move(1, 12)),
             _trial(3, 1, 2, 0.6, rule=True, **_move(2, 13))]
    waiting = merged(*first)
    assert waiting.generation == 1 and waiting.open == [3] and waiting.taken == set()
    assert [m.target for m in waiting.together[1].moves] == [1, 0] and waiting.together[1].trials == (2, 1)
    running = merged(*first, _trial(4, 1, 3, None, TrialState.RUNNING, rule=True, target=3))
    assert running.open == [3] and running.taken == {3}
    both = merged(*first, _trial(4, 1, 3, 0.85, rule=True, target=3),
                  _trial(5, 2, 0, 0.84, rule=True, **_move(0, 21)), _trial(6, 2, 1, 0.5, rule=True, **_move(1, 22)),
                  _trial(7, 2, 2, 0.82, rule=True, **_move(2, 23)))
    assert [[m.target for m in moves] for moves in both.accepted] == [[], [1, 0], []]
    assert both.generation == 3 and both.fitness == [0.85] * 3 and both.holders == [4] * 3 and both.open is None
    best_alone = merged(*first, _trial(4, 1, 3, 0.78, rule=True, target=3))
    assert [[m.target for m in moves] for moves in best_alone.accepted] == [[], [1]]
    assert best_alone.fitness == [0.8] * 3 and best_alone.holders == [2] * 3
    one = merged(*first[:2], _trial(2, 1, 1, 0.7, rule=True, **_move(1, 12)), first[3])  # a tie keeps X(P)
    assert [[m.target for m in moves] for moves in one.accepted] == [[], [0]] and one.fitness == [0.75] * 3
    assert one.holders == [1] * 3 and one.together == {}
    low = merged(*first, maximize=False)  # minimising, only offspring 2 (0.6) beats 0.7
    assert [[m.target for m in moves] for moves in low.accepted] == [[], [2]] and low.fitness == [0.6] * 3
    old = [_trial(0, 0, 0, 0.7, target=0), *(_trial(t.number, 1, t.system_attrs[ATTR]["target"], t.value, **t.params)
                                             for t in first[1:])]
    with pytest.raises(ConfigError, match="older rule.*under a new study name"):
        merged(*old)


def test_integrated_sampler_scores_the_winners_together_before_the_next_generation() -> None:
    """With the real sampler: offspring 0 and 1 of generation 1 beat X(P_0) (0.5); the next trial claims slot 3,
    the two together, and generation 2 is drawn from P_1 with both. Released: the reference is a random other
    (the individuals have no scores of their own), and best1 is refused."""
    from evoopt.errors import ConfigError
    from evoopt.search.evolver import EvolverSampler

    def objective(trial: optuna.Trial) -> float:
        target = trial.suggest_int("target", 0, 3)
        generation = trial.study._storage.get_trial_system_attrs(trial._trial_id)[ATTR]["generation"]
        if generation == 0:
            return 0.5
        if target == 3:
            return 0.9
        for name in ("F", "Cr"):
            trial.suggest_float(name, 0.0, 2.0)
        trial.suggest_int("seed", 0, 2**31 - 1)
        trial.suggest_int("donor_1", 0, 2)
        return [0.6, 0.7, 0.4][target] if generation == 1 else 0.1

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler = EvolverSampler(population=3, integrated=True, strategy="released", generations=1000, seed=0,
                             poll=0.01, wait_timeout=2)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    study.optimize(objective, n_trials=1 + 3 + 1 + 3 * 6)  # generations 2 to 7 reject every offspring
    slots = [(t.system_attrs[ATTR]["generation"], t.system_attrs[ATTR]["target"]) for t in study.trials]
    assert slots[:8] == [(0, 0), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2)]
    assert study.trials[4].params == {"target": 3}
    history = sampler.history(study)
    assert history.generation == 8 and [[m.target for m in moves] for moves in history.accepted][:3] == [[], [1, 0], []]
    assert history.fitness == [0.9] * 3 and history.holders == [4] * 3
    # released, merge-integrated: x_ref = rng.choice(others) whatever the schedule says (p = 0.5005 here); the
    # trials whose draw passes p, and whose random other is not the first (the fittest of equals), tell it apart
    telling = 0
    for trial in study.trials[5:]:
        generation, target = trial.system_attrs[ATTR]["generation"], trial.params["target"]
        rng = np.random.default_rng([0, generation, target])
        rng.integers(2**31)
        past = rng.uniform() >= 0.5 / (1000 - generation) + 0.5  # (the draws of draw_move before the reference's)
        others = [j for j in range(3) if j != target]
        reference = int(rng.choice(others))
        assert trial.params["donor_1"] == reference
        telling += past and reference != others[0]
    assert telling >= 3
    with pytest.raises(ConfigError, match="'best1' mutates around the fittest individual"):
        EvolverSampler(population=4, integrated=True, strategy="best1")


def test_a_trial_failed_on_its_score_is_rejected_not_retried() -> None:
    """An offspring whose score is never finite: the objective fails its trial with NOT_FINITE, the slot is done
    and the offspring rejected, and the generation goes on. Retried, it would draw the same move and fail again,
    forever (seen: trials 6-19 all on one slot). A failed trial without the mark (a dead worker) is retried."""
    from evoopt.errors import EvaluationError
    from evoopt.search.evolver import NOT_FINITE, EvolverSampler

    bad = replay([_trial(0, 0, 0, 0.6, target=0), _trial(1, 0, 1, 0.8, target=1), _trial(2, 0, 2, 0.7, target=2),
                  _trial(3, 1, 0, 0.9, **_move(0, 11)), _trial(4, 1, 1, None, TrialState.FAIL, **_move(1, 12)),
                  _trial(5, 1, 2, 0.75, **_move(2, 13))], size=3, integrated=False, maximize=True, f=0.5, cr=0.5)
    assert bad.generation == 1 and bad.taken == {0, 2}  # unmarked: slot 1 is free for a retry
    marked = [_trial(0, 0, 0, 0.6, target=0), _trial(1, 0, 1, 0.8, target=1), _trial(2, 0, 2, 0.7, target=2),
              _trial(3, 1, 0, 0.9, **_move(0, 11)), _trial(4, 1, 1, None, TrialState.FAIL, **_move(1, 12)),
              _trial(5, 1, 2, 0.75, **_move(2, 13))]
    marked[4].user_attrs[NOT_FINITE] = True
    history = replay(marked, size=3, integrated=False, maximize=True, f=0.5, cr=0.5)
    assert history.generation == 2 and history.fitness == [0.9, 0.8, 0.75]
    # an expert whose own score was not finite holds no trial: a paired selection of its offspring compares with
    # none (it read that failed trial, and its ConfigError stopped the run, again on every resume)
    marked[1] = _trial(1, 0, 1, None, TrialState.FAIL, target=1)
    marked[1].user_attrs[NOT_FINITE] = True
    history = replay(marked[:3], size=3, integrated=False, maximize=True, f=0.5, cr=0.5)
    assert history.fitness == [0.6, None, 0.7] and history.holders == [0, None, 2]

    def objective(trial: optuna.Trial) -> float:
        target = trial.suggest_int("target", 0, 3)
        if trial.study._storage.get_trial_system_attrs(trial._trial_id)[ATTR]["generation"] == 0:
            return float(target)
        for name in ("F", "Cr"):
            trial.suggest_float(name, 0.0, 2.0)
        trial.suggest_int("seed", 0, 2**31 - 1)
        for k in (1, 2, 3):
            trial.suggest_int(f"donor_{k}", 0, 3)
        if target == 2:  # this target's offspring never scores: as Worker.objective fails a non-finite score
            trial.set_user_attr(NOT_FINITE, True)
            raise EvaluationError("not finite")
        return target + 0.5

    sampler = EvolverSampler(population=4, seed=0, poll=0.01, wait_timeout=2)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.optimize(objective, n_trials=16, catch=(EvaluationError,))
    assert sampler.history(study).generation == 4  # 4 experts, then 3 generations of 4: none stalled
    assert sum(t.state == TrialState.FAIL for t in study.trials) == 3


def test_a_trial_holds_a_slot_only_with_a_heartbeat(tmp_path: Path) -> None:
    """A worker killed after its trial took a slot but before optuna's heartbeat thread first beat: the trial must
    still be failed as stale, or every other worker waits for its slot (seen in the kill test: an hour)."""
    import time

    from optuna.storages import RDBStorage, fail_stale_trials

    from evoopt.search.evolver import EvolverSampler

    storage = RDBStorage(f"sqlite:///{tmp_path}/study.db", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, sampler=EvolverSampler(population=3, seed=0), direction="maximize")
    trial = study.ask()  # as a killed worker leaves it: no heartbeat thread ever started
    trial.suggest_int("target", 0, 2)  # the sampler claims a slot
    assert study._storage.get_trial(trial._trial_id).system_attrs[ATTR]["generation"] == 0
    time.sleep(2.2)  # the grace period, and a second more: the storage keeps heartbeats to the second
    fail_stale_trials(study)
    assert study._storage.get_trial(trial._trial_id).state == TrialState.FAIL  # its slot is free again


def test_paired_rule_by_hand() -> None:
    from evoopt.data.outcomes import Outcomes, TaskOutcomes, paired_decision

    def right(values: list[int]) -> Outcomes:
        return Outcomes("accuracy", {"t": TaskOutcomes(np.arange(len(values)), np.asarray(values, bool))})

    target = right([1] * 30 + [0] * 30)
    # worse on 10 of the first 40 examples, better on none: McNemar's exact p_worse = 2^-10
    decided, record = paired_decision(right([1] * 20 + [0] * 20), target, maximize=True, alpha=0.05, final=False)
    assert decided == "rejected" and record["p_worse"] == pytest.approx(2**-10, abs=1e-6) and record["examples"] == 40
    # better on 4 of 60, worse on none: p_better = 2^-4 = .0625
    better = right([1] * 34 + [0] * 26)
    assert paired_decision(better, target, maximize=True, alpha=0.05, final=False)[0] is None  # score more
    decided, record = paired_decision(better, target, maximize=True, alpha=0.05, final=True)
    assert decided == "rejected" and record["p_better"] == pytest.approx(0.0625)  # not sure enough
    decided, _ = paired_decision(better, target, maximize=True, alpha=0.1, final=True)
    assert decided == "accepted"  # at level 0.1 it is
    # better on 2 of 60: 2^-2 = .25, not even at 0.1 (the normal approximation said .077)
    assert paired_decision(right([1] * 32 + [0] * 28), target, maximize=True, alpha=0.1, final=True)[0] == "rejected"
    decided, _ = paired_decision(right([1] * 40 + [0] * 20), target, maximize=True, alpha=0.05, final=True)
    assert decided == "accepted"  # better on 10 of 60


def test_population_applies_a_generation_from_the_same_parents(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from evoopt.models.io import open_source
    from evoopt.search.population import Population

    paths = []
    for i, x in enumerate(X):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": x}, str(paths[-1]))
    (tmp_path / "bin").mkdir()  # a PyTorch checkpoint: its source hands out its own tensors, memory-mapped
    torch.save({"w": X[0].clone()}, tmp_path / "bin" / "pytorch_model.bin")
    safetensors = [open_source(p) for p in paths]
    with_bin = [open_source(tmp_path / "bin"), *safetensors[1:]]
    for folder, sources in ((None, safetensors), (tmp_path / "mapped", safetensors), (None, with_bin)):
        population = Population(sources, ["w"], dtype=torch.float32, folder=folder)
        a, b = Move("paper", 0, (0, 1, 2), 0.5, 1.0, 1), Move("paper", 1, (1, 2, 0), 0.5, 1.0, 2)
        history = replay([], size=3, integrated=False, maximize=True, f=0.5, cr=0.5)
        history.accepted = [[], [a, b]]
        population.advance(history, 1)
        # both children come from P_0: u_0 = x0 + .5 (x1 - x2) = [0,0,0,0]; u_1 = x1 + .5 (x2 - x0) = .5 x0
        assert torch.equal(population.tensors("w")[0], torch.zeros(4))
        assert torch.equal(population.tensors("w")[1], 0.5 * X[0])
        assert torch.equal(population.tensors("w")[2], X[2])
        out = {"w": torch.empty(4)}
        population.write(out, individual=1)
        assert torch.equal(out["w"], 0.5 * X[0])
        assert torch.equal(sources[0].get("w"), X[0])  # the experts themselves are not evolved
        population.reset()
        assert torch.equal(population.tensors("w")[0], X[0])


def test_integrated_candidate_is_the_merge_with_the_offspring_in_place(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from evoopt.merge import get_method
    from evoopt.models.io import open_source
    from evoopt.search.population import Population

    paths = []
    for i, x in enumerate([torch.zeros(4), *X]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": x}, str(paths[-1]))
    base, *experts = (open_source(p) for p in paths)
    method = get_method("task_arithmetic")
    population = Population(experts, ["w"], dtype=torch.float32, method=method, base=base,
                            coefficients=lambda name, n: {"weight": [1.0] * n, "scale": 1.0})
    out = {"w": torch.empty(4)}
    population.write(out)  # X(P_0): base + sum of task vectors = x0 + x1 + x2 = [3,6,9,12]
    assert torch.equal(out["w"], torch.tensor([3.0, 6.0, 9.0, 12.0]))
    population.write(out, Move("paper", 1, (1, 0, 2), 0.5, 1.0, 0))
    # offspring of 1: x1 + .5 (x0 - x2) = [-.5,-1,-1.5,-2]; X = x0 + u + x2 = [2.5,5,7.5,10]
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0, 7.5, 10.0]))
    both = (Move("paper", 1, (1, 0, 2), 0.5, 1.0, 0), Move("paper", 2, (2, 1, 0), 1.0, 1.0, 0))
    population.write(out, together=both)  # u_1 as above; u_2 = x2 + (x1 - x0) = x2 - x0 = x0; X = x0 + u_1 + u_2
    assert torch.equal(out["w"], torch.tensor([1.5, 3.0, 4.5, 6.0]))
    assert all(torch.equal(t, x) for t, x in zip(population.tensors("w"), X, strict=True))  # as it was
    with pytest.raises(ValueError, match="per-model data statistics"):
        Population(experts, ["w"], dtype=torch.float32, method=get_method("fisher"))


# --- determinism: a resumed study and parallel workers reach the population of one process ------------------

def test_evolution_improves_and_is_replayed_exactly(reference: Any) -> None:
    history, population = reference
    assert sum(len(moves) for moves in history.accepted) >= 3  # offspring won their places
    assert history.fitness[history.best] > -1e9
    assert all(m.donors[0] != m.target and m.strategy == "released" for moves in history.accepted for m in moves)


@pytest.mark.slow
def test_resumed_in_a_fresh_process_reaches_the_same_population(llama_family: list[Path], tmp_path: Path,
                                                                reference: Any) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    assert in_process(storage, llama_family, 7).wait() == 0  # stops inside generation 2
    assert in_process(storage, llama_family, 15).wait() == 0  # a fresh process replays and goes on
    history, population = population_after(storage, [str(p) for p in llama_family], GENERATIONS)
    assert history.accepted == reference[0].accepted and history.fitness == reference[0].fitness
    assert all(torch.equal(a, b) for a, b in zip(population, reference[1]))


@pytest.mark.slow
def test_four_workers_reach_the_same_population(llama_family: list[Path], tmp_path: Path, reference: Any) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    optuna.create_study(study_name="tiny-evolver", storage=storage, direction="maximize")
    workers = [in_process(storage, llama_family, 15, sleep=0.2) for _ in range(4)]  # 4 workers, 3 slots a generation
    assert [w.wait() for w in workers] == [0, 0, 0, 0]
    study = optuna.load_study(study_name="tiny-evolver", storage=storage)
    slots_taken = [tuple(t.system_attrs[ATTR].values())[:2] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(slots_taken) == len(set(slots_taken)), "two trials evaluated one offspring"
    history, population = population_after(storage, [str(p) for p in llama_family], GENERATIONS)
    assert history.accepted == reference[0].accepted and history.fitness == reference[0].fitness
    assert all(torch.equal(a, b) for a, b in zip(population, reference[1]))


@pytest.mark.slow
def test_x_evolver_workers_reach_the_same_population_with_winners_scored_together(llama_family: list[Path],
                                                                                  tmp_path: Path) -> None:
    """X_Evolver (task arithmetic): one process and three workers reach the same population, with the extra slot
    that scores a generation's winners together; the score of X(P) never falls."""
    from tests.helpers.evolver import tiny_study

    paths = [str(p) for p in llama_family]
    one, many = f"sqlite:///{tmp_path}/one.db", f"sqlite:///{tmp_path}/many.db"
    tiny_study(one, paths, trials=25, method="task_arithmetic")
    optuna.create_study(study_name="tiny-evolver", storage=many, direction="maximize")
    workers = [in_process(many, llama_family, 25, sleep=0.2, method="task_arithmetic") for _ in range(3)]
    assert [w.wait() for w in workers] == [0, 0, 0]
    trials = optuna.load_study(study_name="tiny-evolver", storage=one).get_trials()
    generation = max(t.system_attrs[ATTR]["generation"] for t in trials) - 1
    reference = population_after(one, paths, generation, integrated=True)
    history, population = population_after(many, paths, generation, integrated=True)
    assert history.together, "no generation had several winners: the test no longer covers them"
    assert any(len(moves) > 1 for moves in history.accepted)
    assert history.accepted == reference[0].accepted and history.fitness == reference[0].fitness
    assert all(torch.equal(a, b) for a, b in zip(population, reference[1]))
    scores = [replay([t for t in trials if t.system_attrs[ATTR]["generation"] <= g], size=3, integrated=True,
                     maximize=True, f=0.8, cr=0.6).fitness[0] for g in range(generation + 1)]
    assert scores == sorted(scores) and scores[-1] > scores[0]


# --- the study engine: Evolver and TIES_Evolver on real MiniLM experts ----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "ties", "fisher"])
def test_evolver_study_on_real_experts_selects_on_dev_and_exports_its_answer(
        method: str, small_experts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForSequenceClassification

    from evoopt.data.objective import ClassifierScorer
    from evoopt.study.config import parse_config
    from evoopt.study.run import Worker, export_trial, report_result, run_study, summary_rows
    from tests.helpers.studies import small_study_config

    built: list[str] = []
    original = ClassifierScorer.__init__

    def spy(self: ClassifierScorer, *args: Any, split: str, **kwargs: Any) -> None:
        built.append(split)
        original(self, *args, split=split, **kwargs)

    monkeypatch.setattr(ClassifierScorer, "__init__", spy)
    experts, _ = small_experts  # two experts: the released code's strategy needs two individuals
    space = {"kind": "evolver", "method": method, "fixed": {"weight": 1.0, "density": 0.5} if method == "ties" else {}}
    config = parse_config(small_study_config(tmp_path, experts, name=f"evolver-{method}", space=space, trials=5,
                                             sampler={"name": "EvolverSampler",
                                                      "options": {"strategy": "released", "generations": 2}}))
    study = run_study(config, report=False).study
    assert built == ["dev"], "the search read another split than dev"
    trials = study.get_trials()
    generations = [t.user_attrs["generation"] for t in trials]
    initial = 2 if method == "none" else 1  # the experts, or their merge
    if method != "none" and all(t.value > trials[0].value for t in trials[1:3]):  # both won: scored together
        assert generations == [0, 1, 1, 1, 2] and trials[3].params["target"] == 2
        assert trials[3].user_attrs["together"] == sorted([1, 2], key=lambda n: -trials[n].value)
    else:
        assert generations == [0] * initial + [1, 1] + [2] * (5 - initial - 2)
    if method == "none":  # greedy selection: the answer is at least the better expert, on dev
        assert max(t.value for t in trials) >= max(t.value for t in trials[:2])

    report_result(config, study)
    assert built[-1] == "test" and "test" not in built[:-1]  # test: reporting, after the search
    result = study.user_attrs["evoopt:result"]
    assert result["generation"] >= 1 and set(result["test"]) == {"vader-tweets", "vader-nyt"}
    assert any(row["name"].startswith("Evolver result") for row in summary_rows(study))

    from click.testing import CliRunner

    from evoopt.cli import main
    from tests.helpers.studies import write_study_config

    printed = CliRunner().invoke(main, ["best", str(write_study_config(tmp_path, small_study_config(
        tmp_path, experts, name=f"evolver-{method}", space=space, trials=5,
        sampler={"name": "EvolverSampler", "options": {"strategy": "released", "generations": 2}})))])
    assert printed.exit_code == 0, printed.output
    assert ("fittest: individual" if method == "none" else f"{method} of it scores (dev)") in printed.output
    assert "answer of generation" in printed.output

    out = export_trial(config, "best", tmp_path / "answer")
    assert "accepted" in (out / "evoopt_recipe.yaml").read_text()
    worker = Worker(config)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert worker.score(reloaded, "dev") == result["dev"]  # the exported model is the one that was scored


def test_fisher_evolver_estimates_the_offspring_statistics(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from evoopt.merge import get_method
    from evoopt.models.io import open_source
    from evoopt.search.population import Population

    paths = []
    for i, x in enumerate(X):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": x}, str(paths[-1]))
    seen: list[torch.Tensor] = []

    def estimate(weights: Any) -> dict[str, torch.Tensor]:  # a stand-in statistic: |w| + 1
        seen.append(weights["w"].clone())
        return {"w": weights["w"].abs() + 1}

    population = Population([open_source(p) for p in paths], ["w"], dtype=torch.float32,
                            method=get_method("fisher"), coefficients=lambda name, n: {"weight": [1.0] * n},
                            statistics=estimate)
    assert len(seen) == 3  # one estimate per expert
    out = {"w": torch.empty(4)}
    population.write(out)
    # element 0: x = 1, 0, 2; F = 2, 1, 3; Fisher merge = (2*1 + 1*0 + 3*2) / (2 + 1 + 3) = 8/6
    assert out["w"][0].item() == pytest.approx(8 / 6)
    move = Move("paper", 1, (1, 0, 2), 0.5, 1.0, 0)  # u_1 = x1 + .5 (x0 - x2) = [-.5, -1, -1.5, -2]
    population.write(out, move)
    assert torch.equal(seen[-1], torch.tensor([-0.5, -1.0, -1.5, -2.0]))  # the offspring's own statistics
    # element 0: x = 1, -.5, 2; F = 2, 1.5, 3: (2 - .75 + 6) / 6.5
    assert out["w"][0].item() == pytest.approx(7.25 / 6.5)


def test_evolver_config_problems_are_named() -> None:
    from evoopt.study.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as error:
        parse_config({"name": "x", "setting": "minilm-sentiment-domains",
                      "space": {"kind": "evolver", "method": "tiess", "search": {"weight": [0, 1]}},
                      "sampler": {"name": "TPESampler"}, "objective": {"multi_objective": True}})
    text = str(error.value)
    for expected in ("space.kind / sampler.name: space.kind evolver and sampler EvolverSampler go together",
                     "space.method: unknown merge method 'tiess'", "or 'none' for the plain Evolver",
                     "space.search / space.log: the Evolver searches the weights themselves",
                     "objective.multi_objective: the Evolver's greedy selection needs one objective"):
        assert expected in text, text
    with pytest.raises(ConfigError, match="go together"):
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "sampler": {"name": "EvolverSampler"}})
    # the answer rules of estimated fitness choose among trials: the Evolver's answer is its population's
    with pytest.raises(ConfigError, match=r"objective.estimate.answer_level: they choose the answer among the "
                                          r"trials; the Evolver's answer is its last population's"):
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "space": {"kind": "evolver"},
                      "sampler": {"name": "EvolverSampler"},
                      "objective": {"estimate": {"method": "anchor", "answer_level": 0.05}}})
    # a pruner compares an offspring with the study's best trial: it would replace the per-target selection
    with pytest.raises(ConfigError, match=r"pruner.name: the Evolver selects each offspring against its own target.*"
                                          r"got RacingPruner.*sampler.options.selection: paired"):
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "space": {"kind": "evolver"},
                      "sampler": {"name": "EvolverSampler"}, "objective": {"fidelities": [50]},
                      "pruner": {"name": "RacingPruner"}})
    parse_config({"name": "x", "setting": "minilm-sentiment-domains", "space": {"kind": "evolver"},
                  "sampler": {"name": "EvolverSampler", "options": {"selection": "paired"}},
                  "objective": {"fidelities": [50]}})  # the Evolver's own early stop
    with pytest.raises(ConfigError, match=r"space.population: only for space.kind evolver or m2n2"):
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "space": {"population": "mmap"}})
    # the paired tests compare right-or-wrong per example: a study of macro-F1 would select on accuracy
    with pytest.raises(ConfigError, match="sampler.options.selection: the paired rule compares right-or-wrong"):
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "space": {"kind": "evolver"},
                      "sampler": {"name": "EvolverSampler", "options": {"selection": "paired"}},
                      "objective": {"metric": "macro_f1"}})
    with pytest.raises(ConfigError, match="pruner.name: RacingPruner tests right-or-wrong per example"):
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "objective": {
            "metric": "macro_f1", "fidelities": [50]}, "pruner": {"name": "RacingPruner"}})
    for space, message in (({"method": "ties", "fixed": {"densty": 0.5}}, "space.fixed.densty: 'ties' has no "
                                                                         "coefficient 'densty'; allowed: density"),
                           ({"method": "none", "fixed": {"weight": 1.0}}, "space.fixed: the plain Evolver")):
        with pytest.raises(ConfigError, match=message):
            parse_config({"name": "x", "setting": "minilm-sentiment-domains", "space": {"kind": "evolver", **space},
                          "sampler": {"name": "EvolverSampler"}})
    from evoopt.search.evolver import EvolverSampler

    with pytest.raises(ValueError, match="strategy 'paper' needs at least 3 individuals, got 2.*F: the differential"):
        EvolverSampler(population=2, F=3.0)
    with pytest.raises(ValueError, match=r"Cr: the crossover rate must be in \(0, 1\], got 0"):
        EvolverSampler(population=4, Cr=0)  # (no entry from the mutant: every offspring its target's copy)


@pytest.mark.slow
def test_paired_selection_on_real_experts_records_each_decision(small_experts: Any, tmp_path: Path) -> None:
    """Two real MiniLM experts, the plain Evolver with ``selection: paired``: each offspring is scored against
    its target's trial on the same examples (20, then 40 per task); the stored decisions are the selection."""
    from evoopt.data.outcomes import trial_outcomes
    from evoopt.study.config import parse_config
    from evoopt.study.run import run_study
    from tests.helpers.studies import small_study_config

    experts, _ = small_experts
    config = parse_config(small_study_config(
        tmp_path, experts, name="paired-evolver", trials=6, space={"kind": "evolver", "method": "none"},
        sampler={"name": "EvolverSampler", "options": {"strategy": "released", "selection": "paired",
                                                        "alpha": 0.3, "poll": 0.05}},
        objective={"limit": 40, "test_limit": 40, "batch_size": 40, "max_length": 48, "fidelities": [20]}))
    trials = run_study(config, report=False).study.get_trials()
    assert all("selection" not in t.user_attrs for t in trials[:2])  # generation 0: the experts themselves
    offspring = trials[2:]
    assert len(offspring) == 4
    for trial in offspring:
        decision = trial.user_attrs["selection"]
        assert decision["decided"] in ("accepted", "rejected") and decision["alpha"] == 0.3
        if trial.state == TrialState.PRUNED:  # rejected at 20 examples per task: scored no further
            assert decision["decided"] == "rejected" and decision["p_worse"] < 0.3 and decision["examples"] == 20
        else:
            assert decision["examples"] == 40
            assert (decision["decided"] == "accepted") is (decision["p_better"] < 0.3 and decision["p_worse"] >= 0.3)
        outcomes = trial_outcomes(trial)
        assert outcomes is not None and outcomes.size == 2 * decision["examples"]
        assert trial.user_attrs["target_trial"] in [t.number for t in trials[: trial.number]]
    history = replay(trials, size=2, integrated=False, maximize=True, f=0.5, cr=0.5)
    accepted = {(g, m.target) for g, moves in enumerate(history.accepted) for m in moves}
    assert accepted == {(t.user_attrs["generation"], t.params["target"]) for t in offspring
                        if t.user_attrs["selection"]["decided"] == "accepted"}


def test_a_trial_waiting_for_a_generation_stops_with_the_runs_time() -> None:
    """Every slot of the generation is held by other workers' trials: a trial waited up to wait_timeout (an hour)
    past the run's --timeout, then ended its worker; now it fails unrun, with an error the run catches, once the
    run's time ends."""
    import time
    from types import SimpleNamespace

    import optuna

    from evoopt.errors import EvaluationError, TimeUp
    from evoopt.search.evolver import EvolverSampler

    sampler = EvolverSampler(population=3, seed=0, poll=0.01)
    sampler.history = lambda study, exclude=None: SimpleNamespace(  # type: ignore[method-assign]
        generation=1, taken={0, 1, 2}, open=None)
    study = optuna.create_study()
    trial = study.ask()
    sampler.deadline = time.monotonic() + 0.05
    with pytest.raises(TimeUp, match="the run's time ended while it waited for generation 1"):
        sampler._claim(study, study._storage.get_trial(trial._trial_id))
    assert issubclass(TimeUp, EvaluationError)  # (the run's catch: the trial fails, the worker goes on)


def test_an_individuals_fisher_does_not_depend_on_the_head_scored_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """X_Evolver with Fisher on per-task heads: the statistics were estimated with whichever task's head the last
    scoring had swapped in, so a resumed run's X(P) differed from an uninterrupted one's."""
    from types import SimpleNamespace

    from transformers import BertForSequenceClassification

    from evoopt.data.objective import ClassifierScorer
    from evoopt.merge.recipe import parse_recipe
    from evoopt.study.kinds.evolver import EvolverKind
    from tests.helpers.models import tiny_bert_config

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    targets = {n: p.data for n, p in model.named_parameters() if not n.startswith("classifier")}
    batch = {"input_ids": torch.randint(5, 90, (3, 8), generator=torch.Generator().manual_seed(1)),
             "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    monkeypatch.setattr("evoopt.merge.merger.calibration_batches", lambda recipe, folder: [batch])
    kind = SimpleNamespace(merger=SimpleNamespace(structure=SimpleNamespace(folder=Path(".")), targets=targets),
                           model=model, device=torch.device("cpu"))
    recipe = parse_recipe({"method": "fisher", "models": [{"model": "a"}, {"model": "b"}],
                           "calibration": {"texts": "t.txt"}})
    statistics = EvolverKind._estimator(kind, recipe)  # type: ignore[arg-type]
    weights = {n: t.clone() for n, t in targets.items()}
    first = statistics(weights)
    g = torch.Generator().manual_seed(2)
    scorer = SimpleNamespace(heads={"other": {"classifier.weight": torch.randn(6, 32, generator=g),
                                              "classifier.bias": torch.randn(6, generator=g)}})
    ClassifierScorer._use_head(scorer, model, "other")  # type: ignore[arg-type]  # (what scoring leaves behind)
    again = statistics(weights)
    assert all(torch.equal(first[n], again[n]) for n in targets)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "fisher"])
def test_an_evolver_study_resumed_through_the_engine_is_the_uninterrupted_one(
        method: str, small_experts: Any, tmp_path: Path) -> None:
    """The resume tests of tests/helpers build their populations over sorted tensor names, outside the engine; the
    engine orders them as the model does and derives crossover masks from that order, statistics from the model:
    a study stopped after 3 trials and run again (a new kind, sampler and population, as a new process builds
    them) gives the trials of one uninterrupted run, parameters and scores."""
    from evoopt.study.config import parse_config
    from evoopt.study.run import run_study
    from tests.helpers.studies import small_study_config

    experts, _ = small_experts

    def config(name: str) -> Any:
        return parse_config(small_study_config(
            tmp_path, experts, name=name, trials=6, space={"kind": "evolver", "method": method},
            sampler={"name": "EvolverSampler", "options": {"strategy": "released", "generations": 3}}))

    whole = run_study(config("whole"), report=False).study
    run_study(config("parts"), n_trials=3, report=False)
    parts = run_study(config("parts"), report=False).study
    assert len(whole.trials) == 6
    assert [(t.params, t.value, t.state) for t in parts.trials] == [(t.params, t.value, t.state) for t in whole.trials]


def test_a_killed_process_population_folder_is_removed_by_the_next_one(tmp_path: Path) -> None:
    """population: mmap keeps N individuals on disk in a temporary folder, removed at exit; a process killed
    (SIGKILL, the OOM killer) left N x the model's size behind for good. Each process holds a lock in its folder:
    the next one removes the folders whose lock it can take, never a live process's (locked) nor one without a
    lock (being made, or another program's)."""
    import fcntl
    from types import SimpleNamespace

    from evoopt.study.kinds.evolver import scratch_folder

    left, live, bare = (tmp_path / f"population-{name}" for name in ("left", "live", "bare"))
    for folder in (left, live, bare):
        folder.mkdir()
        (folder / "0.safetensors").write_bytes(b"x" * 1000)
    (left / ".lock").write_bytes(b"")  # its process is gone: nobody holds it
    (live / ".lock").write_bytes(b"")
    with (live / ".lock").open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        kind = SimpleNamespace(config=SimpleNamespace(artifact_dir=tmp_path))
        made = scratch_folder(kind, "population-")  # type: ignore[arg-type]
        assert not left.exists() and live.exists() and bare.exists()
        assert made.is_dir() and (made / ".lock").exists()
        other = SimpleNamespace(config=SimpleNamespace(artifact_dir=tmp_path))
        again = scratch_folder(other, "population-")  # type: ignore[arg-type]
        assert made.exists() and again.exists()  # (the first one's process, this one, holds its lock)
