"""M2N2: its moves on crafted cases computed by hand (the arithmetic is in the comments), the archive's replay and
weights, determinism across a resume and four workers, and a study on real experts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from evoopt.data.outcomes import OUTCOMES_ATTR, Outcomes, TaskOutcomes, encode, trial_outcomes
from evoopt.errors import EvooptError
from evoopt.search.m2n2 import (
    ATTR,
    attraction,
    competition_fitness,
    crossover,
    pick_parents,
    replaced,
    replay,
    resources,
    slerp_angle,
)
from evoopt.study.kinds import make_kind

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


def test_several_tasks_compete_by_their_weights_not_their_sizes() -> None:
    """Task a has 1000 examples, b 100. X gets .8 and .2 right, Y .7 and .6: the study's value (the mean of the
    tasks) prefers Y (.65 against .50), and so does the competition at alpha 0 (pooled, X had 820 right, Y 760);
    with b weighing 3, (.8 + .6) / 4 = .35 against (.7 + 1.8) / 4 = .625."""
    def member(a: float, b: float) -> Outcomes:
        return Outcomes("accuracy", {"a": TaskOutcomes(np.arange(1000), np.arange(1000) < a * 1000),
                                     "b": TaskOutcomes(np.arange(100), np.arange(100) < b * 100)})

    x, y = member(0.8, 0.2), member(0.7, 0.6)
    scores, weights = resources([x, y])
    assert competition_fitness(scores, 0.0, weights) == pytest.approx([0.50, 0.65])
    assert competition_fitness(scores, 0.0).tolist() == [820, 760]  # (pooled: 820 and 760 of 1100 right)
    scores, weights = resources([x, y], {"b": 3.0})
    assert competition_fitness(scores, 0.0, weights) == pytest.approx([0.35, 0.625])
    # Y as a child of an archive holding X replaces it (pooled, 820 against 760 right: the child was the least fit)
    assert replaced(scores[:1], scores[1], 0.0, weights) == 0
    assert replaced(scores[:1], scores[1], 0.0) is None
    # attraction to Y from X at alpha 1: b's examples 20..59, Y right and X wrong (z = 1), each weighing 3/4 / 100
    assert attraction(scores, 0, 1.0, weights).tolist() == pytest.approx([0.0, 40 * 0.0075])


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


def test_the_slerp_angle_is_the_same_bits_whatever_the_number_of_threads() -> None:
    """`run --workers N` gives each worker fewer threads than one process: a plain sum of 5 M products rounded
    differently with 1 and 2 threads, so a child's coefficients could differ in their last bits."""
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(5_000_003, generator=g)]  # parents close to each other, as merges of one base are
    b = [a[0] + 0.01 * torch.randn(5_000_003, generator=g)]
    threads = torch.get_num_threads()
    try:
        angles = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            angles.append(slerp_angle(a, b))
    finally:
        torch.set_num_threads(threads)
    assert angles[0] == angles[1] == angles[2]
    x, y = a[0].double(), b[0].double()
    dot = float((x * y).sum()) / float(x.norm() * y.norm())
    assert angles[0] == pytest.approx(math.acos(dot), rel=1e-6)  # (acos near 1 magnifies the rounding of dot)


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


# --- the archive's history and weights --------------------------------------------------------------------

def _outcomes(correct: list[int]) -> Outcomes:
    return Outcomes("accuracy", {"t": TaskOutcomes(np.arange(len(correct)), np.array(correct, dtype=bool))})


def _trial(number: int, generation: int, slot: int, correct: list[int] | None, params: dict[str, Any],
           state: TrialState = TrialState.COMPLETE) -> FrozenTrial:
    distributions = {k: IntDistribution(0, 9) if isinstance(v, int) else FloatDistribution(0, 1)
                     for k, v in params.items()}
    attrs: dict[str, Any] = {ATTR: {"generation": generation, "slot": slot, "interpolation": "linear"}}
    if correct is not None:
        attrs[OUTCOMES_ATTR] = encode(_outcomes(correct))
    trial = optuna.trial.create_trial(state=state, params=params, distributions=distributions, system_attrs=attrs,
                                      value=None if state != TrialState.COMPLETE or correct is None
                                      else float(np.mean(correct)))
    trial.number = number
    return trial


def test_resources_are_the_examples_every_member_scored() -> None:
    a = Outcomes("accuracy", {"t": TaskOutcomes(np.array([0, 1, 2]), np.array([True, False, True])),
                              "u": TaskOutcomes(np.array([5]), np.array([True]))})
    b = Outcomes("accuracy", {"t": TaskOutcomes(np.array([2, 1]), np.array([False, True]))})
    scores, weights = resources([a, b])
    assert scores.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # task t, examples 1 and 2; u only in a
    assert weights.tolist() == [0.5, 0.5]  # task t's weight, shared between its two examples
    # perplexity: an example's per-token likelihood, exp(-nll / tokens)
    p = Outcomes("perplexity", {"t": TaskOutcomes(np.array([0, 1]), np.array([2.0, 0.0], dtype=np.float32),
                                                  np.array([4.0, 3.0]))})
    np.testing.assert_allclose(resources([p])[0], [[math.exp(-0.5), 1.0]])
    # mse: exp(-error / the task's mean error over the members), by hand: errors [900, 1800] and [2700, 0], mean
    # 1350; at errors of hundreds exp(-error) was 0.0 for every member, so no member was fitter than another
    # and every child replaced member 0, the best one here included
    m = [Outcomes("mse", {"t": TaskOutcomes(np.array([0, 1]), np.array(e, dtype=np.float32))})
         for e in ([900.0, 1800.0], [2700.0, 0.0], [2000.0, 2000.0])]
    np.testing.assert_allclose(resources(m[:2])[0], np.exp(-np.array([[900.0, 1800.0], [2700.0, 0.0]]) / 1350))
    scores, weights = resources(m)  # the third (errors 2000, 2000) is the least fit of the three: kept out
    assert scores.min() > 0 and replaced(scores[:2], scores[2], weights=weights) is None
    # a result below 0 (no metric a study accepts gives one) or not a number: a share of it is undefined (rng.choice
    # refused the probabilities, or the fitness hid a negative total), so it counts as 0
    n = Outcomes("accuracy", {"t": TaskOutcomes(np.array([0, 1]), np.array([0.5, -0.25]))})
    scores, _ = resources([n, a])
    assert scores.tolist() == [[0.5, 0.0], [1.0, 0.0]]
    pick_parents(scores, np.random.default_rng(0))


def test_replay_places_children_by_joining_then_competing_by_hand() -> None:
    child = {"parent_a": 0, "parent_b": 1, "split": 0.5, "ratio": 0.5}
    trials = [_trial(0, 0, 0, [1, 1, 0, 0], {"member": 0}), _trial(1, 0, 1, [0, 0, 1, 0], {"member": 1}),
              # generation 1 (brood 2, archive 3): the first child joins; the second competes with the three:
              # z = [2, 1, 1, 1] with it ([1, 0, 0, 1]); fitness .5+1, 1, .5, child .5+1: member 2 (.5, first of
              # the ties with the child... the child is not strictly least fit) is replaced
              _trial(2, 1, 0, [1, 0, 0, 0], child), _trial(3, 1, 1, [0, 0, 0, 1], child),
              # generation 2: a child solving nothing is strictly the least fit; a pruned child never enters
              _trial(4, 2, 0, [0, 0, 0, 0], child), _trial(5, 2, 1, None, child, TrialState.PRUNED),
              _trial(6, 3, 0, None, child, TrialState.RUNNING)]
    history = replay(trials, members=2, size=3, brood=2, alpha=1.0, maximize=True)
    assert history.generation == 3 and history.taken == {0}
    assert [p for _, p in history.placed[1]] == [2, 2] and history.placed[2] == []
    assert history.holders == [0, 1, 3] and history.values == [0.5, 0.25, 0.25]
    assert history.best == 0
    # the same trials, minimised: the best is the lowest plain score (the first of the ties)
    assert replay(trials, members=2, size=3, brood=2, alpha=1.0, maximize=False).best == 1
    # an expert whose score was not finite: said so (it was "kept no per-example outcomes")
    broken = _trial(1, 0, 1, [0, 0, 1, 0], {"member": 1}, TrialState.FAIL)
    broken.user_attrs = {"not_finite": True, "fail_reason": "the objective is not finite: {'t': nan}"}
    with pytest.raises(EvooptError, match="expert 1's score is not finite .*'t': nan"):
        replay([trials[0], broken], members=2, size=3, brood=2, alpha=1.0, maximize=True)


def test_archive_builds_a_generation_from_the_archive_before_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from evoopt.models.io import open_source
    from evoopt.search.archive import Archive
    from evoopt.search.m2n2 import ArchiveHistory, Child

    paths = []
    for i, (w, b) in enumerate([(torch.zeros(3), torch.zeros(1)), (torch.ones(3), torch.full((1,), 4.0))]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": w, "b": b}, str(paths[-1]))
    experts = [open_source(p) for p in paths]
    for folder in (None, tmp_path / "mmap"):
        archive = Archive(experts, ["w", "b"], dtype=torch.float32, linear=True, folder=folder)
        assert archive.total == 4
        # order w (entries 0-2) then b (entry 3); split .5 -> entry 2, w = .25: v = [.25, .25, .75 | .75]
        first, second = Child(0, 1, 0.5, 0.25), Child(1, 0, 0.0, 1.0)  # second: v = 0 everywhere: member 1
        history = ArchiveHistory(2, placed=[[], [(first, 2), (second, 0)]])
        archive.advance(history, 1)
        assert len(archive.members) == 3
        torch.testing.assert_close(archive.members[2]["w"], torch.tensor([0.25, 0.25, 0.75]))
        torch.testing.assert_close(archive.members[2]["b"], torch.tensor([3.0]))  # .75 x 4
        torch.testing.assert_close(archive.members[0]["w"], torch.ones(3))  # built from member 1 before g = 1
        out = {"w": torch.empty(3), "b": torch.empty(1)}
        archive.write(out, Child(2, 1, 1.0, 0.5))  # v = .5 everywhere: the mean of members 2 and 1
        torch.testing.assert_close(out["w"], torch.tensor([0.625, 0.625, 0.875]))
        archive.write(out, member=1)
        torch.testing.assert_close(out["b"], torch.tensor([4.0]))
    seed = {"w": torch.full((3,), 0.5), "b": torch.full((1,), 2.0)}  # a merge of the experts joins them
    seeded = Archive(experts, ["w", "b"], dtype=torch.float32, linear=True, seeds=[seed])
    assert len(seeded.members) == 3 and torch.equal(seeded.members[2]["w"], seed["w"])
    seeded.members[2]["w"].add_(1.0)
    seeded.reset()  # the archive's members are copies: a rebuild starts from the seed again
    assert torch.equal(seeded.members[2]["w"], torch.full((3,), 0.5))


def test_sampler_config_problems_are_named() -> None:
    from evoopt.errors import ConfigError
    from evoopt.search.m2n2 import M2N2Sampler
    from evoopt.study.config import parse_config

    with pytest.raises(ConfigError, match="archive: at least the 3 experts.*brood.*interpolation"):
        M2N2Sampler(members=3, archive=2, brood=0, interpolation="cubic")
    with pytest.raises(ConfigError, match="space.kind m2n2 and sampler M2N2Sampler go together"):
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "space": {"kind": "m2n2"}})
    with pytest.raises(ConfigError, match="(?s)space.method.*no merge method.*space.seeds: 'slerp' not.*pruner.name"):
        parse_config({"name": "x", "setting": "minilm-sentiment-domains",
                      "space": {"kind": "m2n2", "method": "dare", "seeds": ["ties", "slerp"]},
                      "sampler": {"name": "M2N2Sampler"}, "pruner": {"name": "MedianPruner"}})
    with pytest.raises(ConfigError, match="space.seeds: 'ties' needs a base .*; give sources.base"):
        parse_config({"name": "x", "sources": {"models": ["m1", "m2"], "tasks": ["vader-tweets"]},
                      "space": {"kind": "m2n2", "seeds": ["ties"]}, "sampler": {"name": "M2N2Sampler"}})
    with pytest.raises(ConfigError, match="space.seeds: only for space.kind m2n2"):
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "space": {"seeds": ["ties"]}})


# --- determinism: a resumed study and parallel workers reach the archive of one process ---------------------

@pytest.fixture(scope="module")
def archive_reference(llama_family: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.helpers.m2n2 import GENERATIONS, archive_after, tiny_study

    storage = f"sqlite:///{tmp_path_factory.mktemp('m2n2')}/study.db"
    tiny_study(storage, [str(p) for p in llama_family], trials=13)
    return archive_after(storage, [str(p) for p in llama_family], GENERATIONS)


def test_archive_improves_and_is_replayed_exactly(archive_reference: Any) -> None:
    history, members = archive_reference
    assert len(members) == 4 and sum(len(p) for p in history.placed) >= 4  # children joined, then won places
    assert max(history.values) > 0.5  # better than every expert on the probes (each solves about half)


@pytest.mark.slow
def test_m2n2_resumed_in_a_fresh_process_reaches_the_same_archive(llama_family: list[Path], tmp_path: Path,
                                                                 archive_reference: Any) -> None:
    from tests.helpers.m2n2 import GENERATIONS, archive_after, in_process

    storage = f"sqlite:///{tmp_path}/study.db"
    assert in_process(storage, llama_family, 6).wait() == 0  # stops inside generation 2
    assert in_process(storage, llama_family, 13).wait() == 0
    history, members = archive_after(storage, [str(p) for p in llama_family], GENERATIONS)
    assert history.placed == archive_reference[0].placed and history.values == archive_reference[0].values
    assert all(torch.equal(a, b) for a, b in zip(members, archive_reference[1], strict=True))


@pytest.mark.slow
def test_m2n2_four_workers_reach_the_same_archive(llama_family: list[Path], tmp_path: Path,
                                                 archive_reference: Any) -> None:
    from tests.helpers.m2n2 import GENERATIONS, archive_after, in_process

    storage = f"sqlite:///{tmp_path}/study.db"
    optuna.create_study(study_name="tiny-m2n2", storage=storage, direction="maximize")
    workers = [in_process(storage, llama_family, 13, sleep=0.2) for _ in range(4)]
    assert [w.wait() for w in workers] == [0, 0, 0, 0]
    study = optuna.load_study(study_name="tiny-m2n2", storage=storage)
    slots = [tuple(t.system_attrs[ATTR].values())[:2] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(slots) == len(set(slots)), "two trials evaluated one child"
    history, members = archive_after(storage, [str(p) for p in llama_family], GENERATIONS)
    assert history.placed == archive_reference[0].placed and history.values == archive_reference[0].values
    assert all(torch.equal(a, b) for a, b in zip(members, archive_reference[1], strict=True))


# --- the study engine: M2N2 on real MiniLM experts --------------------------------------------------------

@pytest.mark.slow
def test_m2n2_study_on_real_experts_reports_and_exports_its_answer(small_experts: Any, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from transformers import AutoModelForSequenceClassification

    from evoopt.cli import main
    from evoopt.study.config import parse_config
    from evoopt.study.run import Worker, export_trial, report_result, run_study, summary_rows
    from tests.helpers.studies import small_study_config, write_study_config

    experts, _ = small_experts
    data = small_study_config(tmp_path, experts, name="m2n2", space={"kind": "m2n2", "seeds": ["ties"]}, trials=5,
                              sampler={"name": "M2N2Sampler", "options": {"archive": 4, "poll": 0.05}})
    config = parse_config(data)
    study = run_study(config, report=False).study
    trials = study.get_trials()
    assert [t.user_attrs["generation"] for t in trials] == [0, 0, 0, 1, 2]  # two experts and their TIES merge
    assert [t.params.get("member") for t in trials[:3]] == [0, 1, 2]
    first = [t.user_attrs["first member"] for t in trials[:3]]  # (an expert's label: its folder's name)
    assert first[0].startswith("expert vader-tweets") and first[1].startswith("expert vader-nyt")
    assert first[2] == "ties merge of the experts"
    kind = make_kind(config)
    assert "seed merge: ties" in kind.record(trials[2]) and "expert: 1" in kind.record(trials[1])
    assert all(set(t.params) == {"parent_a", "parent_b", "split", "ratio"} for t in trials[3:])
    assert all(trial_outcomes(t) is not None for t in trials)
    report_result(config, study)
    result = study.user_attrs["evoopt:result"]
    history = kind.history(study)  # type: ignore[attr-defined]
    assert result["trial"] == history.holders[history.best] and result["generation"] == 2
    assert study.trials[result["trial"]].value == max(history.values)  # the best by plain dev score
    assert set(result["test"]) == {"vader-tweets", "vader-nyt"}
    assert any(row["name"].startswith("M2N2 result") for row in summary_rows(study))
    printed = CliRunner().invoke(main, ["best", str(write_study_config(tmp_path, data))])
    assert printed.exit_code == 0, printed.output
    assert "archive after generation 2" in printed.output and "answer of generation 2" in printed.output
    out = export_trial(config, "best", tmp_path / "answer")
    assert "placed" in (out / "evoopt_recipe.yaml").read_text()
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert Worker(config).score(reloaded, "dev") == result["dev"]  # the exported model is the one scored
