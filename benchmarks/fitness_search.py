"""Search outcome with cheap fitness: full-dev against estimated fitness at the same wall-clock budget.

Per setting (``--settings``, default minilm-cross-task, where the candidates spread) and per search,
layer-wise TIES with evoopt's CMA-ES and TIES_Evolver (``--searches``: also global TIES with the same
CMA-ES and the plain Evolver, for the issue's 60-minute goals; and the method search, where what a search finds
holds on test), the arms (``--arms``) run for ``--budget`` seconds each, for ``--seeds`` study seeds (the
sampler's and the estimator's subset):

- ``full``: every trial scored on the whole dev set (the searches as they were);
- ``anchor``: every trial scored on ``--fraction`` of dev chosen by anchor points and its full-dev
  score estimated (``objective.estimate``; fitted on the baselines' dev outcomes, never test);
- ``mixture``: the first ``--references`` trials (20) scored on the whole dev set
  (``objective.estimate.references``), every later one on ``--fraction`` of dev with the ``mixture`` estimator
  (fitted on the baselines and those trials; with ``--references 0`` on the baselines alone);
- ``mixture-paired``: the mixture arm with the paired answer rule (``objective.estimate.answer_level`` 0.05): a
  later stop changes the answer only for a confirmed trial better than it by a paired test on whole dev; each
  stop also records (and scores on test) the answer the same run has without the test, the best confirmed dev;
- ``mixture-promote``: the mixture arm confirming as the search goes (``objective.estimate.promote_within`` 0,
  ``confirm`` 0): a trial whose estimate beats the best whole-dev score so far is scored on the whole dev set at
  once, inside the budget, and the answer is the best whole-dev trial; nothing is scored after the search.
  With ``--answers``, every answer it (and the full arm) had is scored on test: the answer at every moment
  against the dev examples scored, and the issue's "equal with a fifth of the examples" read off it;
- ``raced``: every trial scored stage by stage (``objective.fidelities``: ``--fidelities`` examples per
  task) and stopped once a paired test on the same examples finds it worse at level 0.05: the racing
  pruner against the best complete trial (CMA-ES), the paired selection rule against its target
  (TIES_Evolver); on smollm2-tasks (100 dev examples per task, scored through lm-eval stage by stage) at
  25 and 50. There the TIES_Evolver, with two experts, mutates as the authors' released code does.

Each run is stopped ``--stages`` times along its budget; at each stop its answer (the best trial, or
the Evolver's population answer) is scored on the whole dev set and on test, for reporting only, and
the dev examples its trials have scored so far are counted (from their stored per-example outcomes).
A run's study kind (its sources, evaluation model and merge methods' preparation) is built once and kept
across its stops, as one worker keeps it.
The arms of one seed run one after the other (full, anchor, raced), so the machine's load falls on all;
with ``--jobs N``, N runs at a time, each in its own process on one CPU thread.

Printed and written: a table per search and arm (trials, dev examples scored, answer's test score:
median, min and max over seeds, beside fixed TIES and the best source) and a plot of the answer's
test score against dev examples scored (and, below it, each run's best whole-dev score so far). Each run's
record in the JSON also counts how its trials were decided (accepted, rejected or pruned at N examples per task).
The baselines are scored once per setting, in the first study of fitness_cost.py in the same
``--workdir`` (made here when missing) and copied to every run, so no run pays for them;
a rerun resumes every finished run from its database.

    python benchmarks/fitness_search.py [--settings minilm-cross-task] [--budget 300] [--seeds 3] [--first-seed 0]
        [--searches layerwise-cma ties-evolver] [--arms full anchor raced] [--fraction 0.2]
        [--fidelities 50 100 200] [--references 20] [--stages 3] [--jobs 1] [--workdir out/fitness_cost]
        [--out benchmarks/results]
        [--name fitness_search]

A setting's results replace its own entry in ``NAME.json``, the other settings' kept; runs of the setting at
the same budget and fraction that this call did not make (another search, arm, count of reference trials or
seed) are kept in it too, and the table has a row per mixture arm's count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import optuna
import transformers
from fitness_cost import evolver_strategy, study_config

from evoopt.data.objective import combine
from evoopt.data.outcomes import challenge_in_turn, trial_outcomes
from evoopt.search.cma import finished_generations
from evoopt.study.evaluator import Evaluator
from evoopt.study.fitness import PRECISION_ATTR, study_autocast
from evoopt.study.kinds import make_kind
from evoopt.study.run import open_study, report_best, run_baselines, run_study
from evoopt.study.storage import ANSWER_ATTR, BASELINE_OUTCOMES_ATTR, FINISHED, best_trial, better, data_rules

SEARCHES: dict[str, dict[str, Any]] = {
    "layerwise-cma": {
        "space": {"kind": "layerwise", "method": "ties", "layers_per_group": 2,
                  "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}},
        "sampler": {"name": "EvoCmaSampler", "options": {"x0": 0.5, "sigma0": 0.1667}}},
    # global-cma and evolver: the searches of the 60-minute goals (--searches; not run by default)
    "global-cma": {  # one TIES weight and density per expert (OptunaHub's evo_merge space), same sampler
        "space": {"kind": "global", "method": "ties", "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}},
        "sampler": {"name": "EvoCmaSampler", "options": {"x0": 0.5, "sigma0": 0.1667}}},
    "ties-evolver": {
        "space": {"kind": "evolver", "method": "ties", "fixed": {"weight": 1.0, "density": 0.5}},
        "sampler": {"name": "EvolverSampler", "options": {"strategy": "paper", "F": 0.5, "Cr": 0.5}}},
    "evolver": {  # the plain Evolver: the experts' weights themselves, no merge method around them
        "space": {"kind": "evolver", "method": "none"},
        "sampler": {"name": "EvolverSampler", "options": {"strategy": "paper", "F": 0.5, "Cr": 0.5}}},
    # the method search (beyond.py's): one CMA-ES per merge method from its known-good start, methods raced by
    # successive rejects; on minilm-cross-task it answers with TSV-M or Iso-CTS, 16 points of test above fixed TIES
    "method-search": {"space": {"kind": "methods"},
                      "sampler": {"name": "EvoCmaSampler", "options": {"sigma0": 0.1667}}},
}
_TIES_EVOLVER = SEARCHES["ties-evolver"]
SEARCHES["ties-evolver-f0.1"] = {  # the TIES_Evolver with a tenth of the difference vector (F = 0.1): smaller moves
    **_TIES_EVOLVER, "sampler": {**_TIES_EVOLVER["sampler"], "options": {**_TIES_EVOLVER["sampler"]["options"],
                                                                         "F": 0.1}}}
DEFAULT_SEARCHES = ["layerwise-cma", "ties-evolver"]
EVOLVERS = tuple(name for name, search in SEARCHES.items() if search["space"]["kind"] == "evolver")
ARMS = ("full", "anchor", "raced", "mixture", "mixture-paired", "mixture-promote")
ANSWER_LEVEL = 0.05  # the mixture-paired arm's objective.estimate.answer_level
PROMOTE_WITHIN = 0.0  # the mixture-promote arm's objective.estimate.promote_within (with confirm: 0)
REFERENCES = 20  # the mixture arm's first trials, scored on the whole dev set (objective.estimate.references)
MANY = 1_000_000  # trials: the budget is time


def quiet() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_merged(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``results`` (by setting) into the JSON at ``path``, the settings not run here kept; returns them all."""
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **results}
    from evoopt.models.io import atomic_write

    atomic_write(path, json.dumps(merged, indent=2) + "\n")  # (it gathers runs over days)
    return merged


def reference_config(folder: Path, setting: str) -> Any:
    """The config of the setting's study holding the baselines (fitness_cost.py's first)."""
    return study_config(folder, setting, "layerwise-cma", 1, **SEARCHES["layerwise-cma"])


def reference(folder: Path, setting: str) -> optuna.Study:
    """The setting's study holding the baselines' scores and per-example dev outcomes (fitness_cost.py's first)."""
    config = reference_config(folder, setting)
    study = open_study(config)
    if "evoopt:baselines" not in study.user_attrs:
        run_baselines(config, study=study)
    return study


def copy_baselines(source: optuna.Study, study: optuna.Study) -> None:
    """The baselines' rows, per-example dev outcomes and precision check, as `evoopt baselines` stores them."""
    if "evoopt:baselines" in study.user_attrs:
        return
    attrs = source._storage.get_study_system_attrs(source._study_id)
    for key, value in attrs.items():
        if key.startswith(BASELINE_OUTCOMES_ATTR) or key == PRECISION_ATTR:
            study._storage.set_study_system_attr(study._study_id, key, value)
    study.set_user_attr("evoopt:baselines", source.user_attrs["evoopt:baselines"])


def answer(study: optuna.Study) -> dict[str, Any] | None:
    """The study's reported answer: its whole-dev and test scores."""
    result = study.user_attrs.get("evoopt:result")  # the Evolver's population answer
    if result is not None:
        return {"dev": result["dev"], "test": result["test"]}
    best = best_trial(study)
    return None if best is None else study.user_attrs.get("evoopt:test", {}).get(str(best.number))


FIDELITIES = {"smollm2-tasks": [25, 50]}  # examples per task where a raced trial is tested (it has 100 each)


def one_run(folder: Path, setting: str, search: str, arm: str, seed: int, args: argparse.Namespace,
            threads: int | None = None) -> dict[str, Any]:
    """One search, arm and seed; ``threads``: the torch threads of a worker process (``--jobs`` > 1)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        quiet()
    base_config = reference_config(folder, setting)
    base = open_study(base_config)
    # a mixture arm with other than the default references is another study (its own name in --workdir)
    mixture = arm.startswith("mixture")
    variant = f"-r{args.references}" if mixture and args.references != REFERENCES else ""
    name = f"{search}-{arm}{variant}-seed{seed}"
    # the precision the reference study's trials were scored in (its bfloat16 check, as `auto` reads it)
    objective: dict[str, Any] = {"precision": "bfloat16" if study_autocast(base_config, base) else "float32"}
    overrides = json.loads(json.dumps(SEARCHES[search]))
    if search in EVOLVERS:  # the paper's mutation needs three experts; smollm2-tasks has two
        overrides["sampler"]["options"]["strategy"] = evolver_strategy(setting)
    if arm == "anchor":
        objective["estimate"] = {"method": arm, "fraction": args.fraction}
    elif mixture:  # it predicts from the study's own first trials: they are scored on the whole dev set
        objective["estimate"] = {"method": "mixture", "fraction": args.fraction, "references": args.references}
        if arm == "mixture-paired":
            objective["estimate"]["answer_level"] = ANSWER_LEVEL
        elif arm == "mixture-promote":  # confirmed as the search goes, inside the budget; nothing after it
            objective["estimate"].update(confirm=0, promote_within=PROMOTE_WITHIN)
    elif arm == "raced":
        objective["fidelities"] = args.fidelities or FIDELITIES.get(setting, [50, 100, 200])
        if search in EVOLVERS:  # the paired rule replaces the greedy one
            sampler = overrides["sampler"]
            overrides["sampler"] = {**sampler, "options": {**sampler["options"], "selection": "paired", "alpha": 0.05}}
        else:
            overrides["pruner"] = {"name": "RacingPruner", "options": {"alpha": 0.05}}
    defaults = study_config(folder, setting, "x", 1).objective.model_dump(exclude={"estimate"})
    config = study_config(folder, setting, name, MANY, seed=seed,
                          objective={**defaults, **objective}, **overrides)
    study = open_study(config)
    copy_baselines(base, study)
    stages: list[dict[str, Any]] = study.user_attrs.get("bench:stages", [])
    kind = make_kind(config) if len(stages) < args.stages else None  # kept across the stops, as by one worker
    for stage in range(len(stages), args.stages):
        started = time.perf_counter()
        run_study(config, timeout=args.budget / args.stages, baselines=False, kind=kind)
        seconds = time.perf_counter() - started  # the stage's trials and the answer's report (and the first's build)
        trials = study.get_trials(deepcopy=False, states=FINISHED)
        examples = scored_examples(study, trials)
        found = answer(study)
        stages.append({"stage": stage + 1, "trials": len(trials), "examples": examples,
                       "trial_seconds": sum(t.duration.total_seconds() for t in trials if t.duration),
                       "seconds": seconds, "dev": combine(found["dev"]) if found else None,
                       "test": combine(found["test"]) if found else None})
        if arm == "mixture-paired":  # the same run's answer without the paired test, for comparison
            stages[-1].update(without_test(config, study, kind))
        study.set_user_attr("bench:stages", stages)
        last = stages[-1]
        print(f"  {name} stage {stage + 1}: {last['trials']} trials, {last['examples']} dev examples, answer "
              f"dev {last['dev'] or float('nan'):.4f} test {last['test'] or float('nan'):.4f}", flush=True)
    last = stages[-1]
    if arm == "anchor" and search not in EVOLVERS and "confirmed_test" not in last:
        # runs made before estimate.confirm: the confirmation of the last stage, done now
        report_best(config, study)
        found = answer(study)
        assert found is not None
        last.update(confirmed_dev=combine(found["dev"]), confirmed_test=combine(found["test"]),
                    confirmed_examples=scored_examples(study, study.get_trials(deepcopy=False, states=FINISHED)))
        study.set_user_attr("bench:stages", stages)
        print(f"  {name} confirmed: answer dev {last['confirmed_dev']:.4f} test {last['confirmed_test']:.4f}")
    # cma_generations: None for other samplers; the method search (one CMA-ES per method, no restarts): the furthest
    record = {"search": search, "arm": arm, "seed": seed, "jobs": args.jobs, "stages": stages, "curve": curve(study),
              "decisions": decisions(study), "cma_generations": finished_generations(study.get_trials(deepcopy=False))}
    if args.answers and arm in ("full", "mixture-promote"):  # their answer is the best whole-dev trial so far
        kind = kind or make_kind(config)
        record["answers"] = answers(config, study, kind)
        if arm == "mixture-promote":  # the same run's answers had it set answer_level (the search is the same)
            record["paired_answers"] = answers(config, study, kind, ANSWER_LEVEL)
    return {**record, "references": args.references} if mixture else record


def without_test(config: Any, study: optuna.Study, kind: Any) -> dict[str, Any]:
    """The answer the mixture-paired run would have without its paired test (``answer_level`` unset): the best
    whole-dev score of its confirmed and reference trials (the answer's ``best``). Its test score is that of the
    study's report where the two agree, else scored here (float32, the whole test split, once per trial)."""
    stored = study.user_attrs.get(ANSWER_ATTR)
    if not stored:
        return {}
    number = stored["best"]
    dev = stored["dev"].get(str(number)) or study.get_trials(deepcopy=False)[number].user_attrs["scores"]
    return {"answer_trial": stored["trial"], "untested_trial": number,
            "untested_dev": combine(dev),  # confirmed, or a reference trial's own
            "untested_test": test_score(config, study, kind, number)}


_TEST_EVALUATORS: dict[str, Evaluator] = {}  # by study: one per run a process makes


def test_score(config: Any, study: optuna.Study, kind: Any, number: int) -> float:
    """A trial's test score (reporting only): the study's report of it where there is one, else its model rebuilt
    and scored on the whole test split once (float32) and kept in the study (``bench:answers``; runs made before
    kept them in ``bench:without_test``)."""
    key = str(number)
    reports = study.user_attrs.get("evoopt:test", {})
    if key in reports:
        return float(combine(reports[key]["test"]))
    kept = study.user_attrs.get("bench:answers", {})
    earlier = study.user_attrs.get("bench:without_test", {})
    if key in kept or key in earlier:
        return float(kept[key]) if key in kept else float(combine(earlier[key]["test"]))
    kind.built(study)
    if config.name not in _TEST_EVALUATORS:
        _TEST_EVALUATORS[config.name] = Evaluator(config, kind.sources, kind.tokenizer_folder, kind.device)
    model = kind.trial_model(study.get_trials(deepcopy=False)[number].params)
    found = float(combine(_TEST_EVALUATORS[config.name].score(model, "test")))
    study.set_user_attr("bench:answers", {**kept, key: found})
    return found


def answers(config: Any, study: optuna.Study, kind: Any, level: float | None = None) -> list[list[float]]:
    """The run's answer at every moment, scored on test (reporting only): a point ``[examples, trial, dev, test]``
    where its answer changes (:func:`best_so_far`, with ``level`` by the paired answer rule), each answer scored on
    test once (:func:`test_score`). For the arms whose answer is that trial: full-dev fitness, and the mixture
    with promotions (confirm: 0)."""
    changes, _ = best_so_far(study, level, config.objective.weights)
    return [[examples, trial.number, float(trial.value), test_score(config, study, kind, trial.number)]  # type: ignore[arg-type]
            for examples, trial in changes]


def examples_scored(trial: optuna.trial.FrozenTrial) -> int:
    """The dev examples a trial scored: its stored outcomes, and a promoted trial's estimator examples before."""
    outcomes = trial_outcomes(trial)
    return (0 if outcomes is None else outcomes.size) + trial.user_attrs.get("promoted", {}).get("examples", 0)


def gain_points(mine: float, theirs: float, maximize: bool) -> float:
    """How far ``mine`` is above ``theirs`` in points, in the study's direction."""
    return round(100 * (mine - theirs if maximize else theirs - mine), 2)


def fifth(runs: list[dict[str, Any]], maximize: bool) -> list[dict[str, Any]]:
    """The issue's second way to pass, read off each run's answers (:func:`answers`): its answer once it had
    scored a fifth of the dev examples of its seed's full run, and at its end, against the full run's final
    answer on test (points, positive where the run is better in the study's direction). A run with
    ``paired_answers`` (the same run's answers by the paired answer rule) has a second row for them."""
    rows = []
    for run, reference in against_full(runs):
        if not reference.get("answers"):
            continue
        total, theirs = reference["stages"][-1]["examples"], reference["answers"][-1][3]
        for key, label in (("answers", arm_label(run)), ("paired_answers", f"{arm_label(run)}, paired answer")):
            if not run.get(key):
                continue
            early = [p for p in run[key] if p[0] <= total / 5]
            rows.append({"search": run["search"], "arm": label, "seed": run["seed"], "full_examples": total,
                         "full_test": theirs, "fifth_test": early[-1][3] if early else None,
                         "fifth_gain_points": gain_points(early[-1][3], theirs, maximize) if early else None,
                         "end_examples": run["stages"][-1]["examples"], "end_test": run[key][-1][3],
                         "end_gain_points": gain_points(run[key][-1][3], theirs, maximize)})
    return rows


def decisions(study: optuna.Study) -> dict[str, Any]:
    """How the run's trials were decided: counts of ``accepted``, ``rejected at N`` (the paired rule, N examples
    per task), ``pruned at N`` (a pruner) and ``scored`` (complete, no rule), and the median paired difference
    in points (offspring minus target, in the study's direction) of the paired rule's decisions."""
    counts: dict[str, int] = {}
    differences: dict[str, list[float]] = {}
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        record = trial.user_attrs.get("selection")
        if record is not None:
            key = record["decided"] if record["decided"] == "accepted" else f"rejected at {record['examples']}"
            differences.setdefault(record["decided"], []).append(100 * record["difference"])
        else:
            key = f"pruned at {trial.user_attrs['pruned_at']}" if "pruned_at" in trial.user_attrs else "scored"
        counts[key] = counts.get(key, 0) + 1
    return {"counts": counts, "median_difference": {k: round(statistics.median(v), 2) for k, v in differences.items()}}


def kept_runs(path: Path, setting: str, args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The setting's runs already in the results file at the same budget and fraction, on rows made by the same
    data rules, that this call did not run (another search, arm or seed, run on another day): kept beside this
    call's, so one file gathers them."""
    stored = json.loads(path.read_text()).get(setting) if path.exists() else None
    if not stored or stored["budget"] != args.budget or stored["fraction"] != args.fraction:
        return []
    if stored.get("data") != data_rules():  # (runs before 2026-12-06 have none: dev held near-duplicates of train)
        return []
    ran = {run_key(r) for r in runs}
    return [r for r in stored["runs"] if run_key(r) not in ran]


def run_key(run: dict[str, Any]) -> tuple[str, str, int | None, int]:
    """What makes a run its own: search, arm, the mixture arm's reference trials (None for the other arms), seed."""
    return run["search"], run["arm"], run.get("references"), run["seed"]


def best_so_far(study: optuna.Study, level: float | None = None,
                weights: dict[str, float] | None = None) -> tuple[list[tuple[int, optuna.trial.FrozenTrial]], int]:
    """Each change of the run's answer among its whole-dev trials (complete trials' values; an estimated value is
    not a whole-dev score), in trial order, with the dev examples scored by then; and the dev examples scored in
    all. The answer is the best whole-dev trial so far in the study's direction; with ``level``, the paired answer
    rule as a study with promotions applies it (``objective.estimate.answer_level``): the product's
    :func:`challenge_in_turn` run once over the whole-dev trials, each challenging the answer of its time, the first
    being the first answer (these runs have no reference trials)."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number)
    whole = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
             and "estimated" not in t.user_attrs]
    taken: set[int] = set()
    if level is not None and whole:
        outcomes = {t.number: trial_outcomes(t) for t in whole}
        kept = {n: o for n, o in outcomes.items() if o is not None}
        if len(kept) < len(outcomes):  # compared by score, a challenge leaves no record to read the changes from
            raise SystemExit(f"{study.study_name}: whole-dev trials without kept outcomes; the paired rule needs them")
        _, records = challenge_in_turn(whole[0].number, [t.number for t in whole[1:]], kept,
                                       {t.number: float(t.value) for t in whole},  # type: ignore[arg-type]
                                       maximize=maximize, alpha=level, weights=weights)
        taken = {r["challenger"] for r in records if r["decided"] == "accepted"}
    numbers = {t.number for t in whole}
    changes: list[tuple[int, optuna.trial.FrozenTrial]] = []
    examples = 0
    for trial in trials:
        examples += examples_scored(trial)
        if trial.number not in numbers:
            continue
        if not changes:
            taking = True
        elif level is not None:
            taking = trial.number in taken
        else:
            taking = better(trial.value, changes[-1][1].value, maximize=maximize)  # type: ignore[arg-type]
        if taking:
            changes.append((examples, trial))
    return changes, examples


def curve(study: optuna.Study) -> list[list[float]]:
    """The run's best whole-dev score so far against the dev examples scored so far (:func:`best_so_far`): a point
    where the best changes, and the last."""
    changes, total = best_so_far(study)
    points = [[examples, float(trial.value)] for examples, trial in changes]  # type: ignore[arg-type]
    if points and points[-1][0] != total:
        points.append([total, points[-1][1]])
    return points


def reached(points: list[list[float]], target: float, maximize: bool) -> float | None:
    """The dev examples a run had scored when its best whole-dev score (its ``curve``) first reached ``target``
    in the study's direction (equal within float rounding counts); None if it never did."""
    return next((examples for examples, best in points
                 if (best >= target - 1e-9 if maximize else best <= target + 1e-9)), None)


def scored_examples(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> int:
    """The dev examples a run has scored: its trials' (their stored outcomes) and the whole-dev scorings of the
    best estimates that ``objective.estimate.confirm`` made."""
    examples = sum(map(examples_scored, trials))
    confirmed = study.user_attrs.get(ANSWER_ATTR, {}).get("dev", {})
    whole = next((t.user_attrs["estimated"]["of"] for t in trials if "estimated" in t.user_attrs), 0)
    return examples + len(confirmed) * whole


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per search and arm (a mixture arm per count of reference trials): medians and range over seeds."""
    rows = []
    for search, arm, references in dict.fromkeys(run_key(r)[:3] for r in runs):  # in the runs' order
        mine = [r["stages"][-1] for r in runs if run_key(r)[:3] == (search, arm, references)]
        tests = [s["test"] for s in mine if s["test"] is not None]
        label = arm_label({"arm": arm, "references": references})
        rows.append({"search": search, "arm": label, "seeds": len(mine),
                     "trials": statistics.median(s["trials"] for s in mine),
                     "examples": statistics.median(s["examples"] for s in mine),
                     "dev": statistics.median(s["dev"] for s in mine if s["dev"] is not None),
                     "test": statistics.median(tests), "test_range": [min(tests), max(tests)]})
        if all("untested_test" in s for s in mine):  # the same runs' answers without the paired answer rule
            untested = [s["untested_test"] for s in mine]
            rows.append({**rows[-1], "arm": f"{label} (answer: best confirmed dev)",
                         "dev": statistics.median(s["untested_dev"] for s in mine),
                         "test": statistics.median(untested), "test_range": [min(untested), max(untested)]})
        if all("confirmed_test" in s for s in mine):  # the answer after estimate.confirm
            confirmed = [s["confirmed_test"] for s in mine]
            rows.append({**rows[-1], "arm": f"{label}+confirm",
                         "examples": statistics.median(s["confirmed_examples"] for s in mine),
                         "dev": statistics.median(s["confirmed_dev"] for s in mine),
                         "test": statistics.median(confirmed), "test_range": [min(confirmed), max(confirmed)]})
    return rows


def against_full(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each run of another arm with the full arm's run of its search and seed (runs without one left out)."""
    full = {(r["search"], r["seed"]): r for r in runs if r["arm"] == "full"}
    return [(r, full[r["search"], r["seed"]]) for r in runs if r["arm"] != "full" and (r["search"], r["seed"]) in full]


def equal_time(runs: list[dict[str, Any]], maximize: bool) -> list[dict[str, Any]]:
    """Each other arm's run against the full arm's run of its search and seed at about equal total time. A stop's
    ``seconds`` hold its search and its report (the confirmations and test scorings are outside ``--budget``), so
    the run's stop whose elapsed seconds are nearest the full run's total is compared with the full run's end:
    the difference of their answers' test scores in points, positive where the run is better in the study's
    direction."""
    rows = []
    for run, reference in against_full(runs):
        if not all("seconds" in s for s in run["stages"] + reference["stages"]):
            continue
        total = sum(s["seconds"] for s in reference["stages"])
        elapsed = list(itertools.accumulate(s["seconds"] for s in run["stages"]))
        stop = min(range(len(elapsed)), key=lambda k: abs(elapsed[k] - total))
        mine, theirs = run["stages"][stop]["test"], reference["stages"][-1]["test"]
        if mine is None or theirs is None:
            continue
        rows.append({"search": run["search"], "arm": arm_label(run), "seed": run["seed"], "stop": stop + 1,
                     "seconds": round(elapsed[stop]), "full_seconds": round(total), "test": mine, "full_test": theirs,
                     "gain_points": gain_points(mine, theirs, maximize)})
    return rows


def arm_label(run: dict[str, Any]) -> str:
    """The run's arm as the plot's legend names it: a mixture arm with its reference trials."""
    return run["arm"] if run.get("references") is None else f"{run['arm']}, {run['references']} references"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(setting, search) for setting in results for search in SEARCHES
              if any(r["search"] == search for r in results[setting]["runs"])]
    curves = any("curve" in r for setting in results for r in results[setting]["runs"])
    figure, axes = plt.subplots(2 if curves else 1, len(panels), figsize=(5.5 * len(panels), 8.4 if curves else 4.2),
                                squeeze=False)
    colours = {"full": "tab:blue", "anchor": "tab:orange", "raced": "tab:green", "mixture": "tab:purple",
               "mixture-paired": "tab:brown", "mixture-promote": "tab:olive"}
    named: set[tuple[Any, str]] = set()
    markers, dashes = "osD^vP", ["-", "--", ":", "-."]  # one per seed (by its place among the seeds run)
    seeds = sorted({r["seed"] for setting in results for r in results[setting]["runs"]})

    def seed_style(run: dict[str, Any]) -> tuple[str, str]:
        place = seeds.index(run["seed"])
        return markers[place % len(markers)], dashes[place % len(dashes)]

    def once(ax: Any, label: str) -> str | None:
        """A legend entry once per panel (the first seed of each arm)."""
        if (ax, label) in named:
            return None
        named.add((ax, label))
        return label

    for ax, (setting, search) in zip(axes[-1] if curves else [], panels):  # the search's own view: dev
        result = results[setting]
        for run in (r for r in result["runs"] if r["search"] == search and r.get("curve")):
            examples, best = zip(*run["curve"])
            ax.step([e / 1000 for e in examples], [100 * b for b in best], where="post", color=colours[run["arm"]],
                    alpha=0.8, linestyle=seed_style(run)[1], label=once(ax, f"{arm_label(run)} (line: seed)"))
            ax.annotate(f"seed {run['seed']}", (examples[-1] / 1000, 100 * best[-1]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points", color=colours[run["arm"]])
        dev = result.get("references_dev", {})
        if "ties (fixed)" in dev:
            ax.axhline(100 * dev["ties (fixed)"], color="grey", linestyle="--", label="ties (fixed)")
        if search == "evolver" and "linear (fixed)" in dev:
            ax.axhline(100 * dev["linear (fixed)"], color="black", linestyle=":", label="linear (fixed): averaging")
        ax.set(title=f"{setting}: {search}\nbest whole-dev score so far", xlabel="dev examples scored (thousands)",
               ylabel="best trial's dev score (%)")
        ax.legend(fontsize=7, framealpha=0.6)
    for ax, (setting, search) in zip(axes[0], panels):
        result = results[setting]
        for run in (r for r in result["runs"] if r["search"] == search):
            stages = [s for s in run["stages"] if s["test"] is not None]
            if run.get("answers"):  # the answer at every moment (--answers), the stops as markers on it
                moments = [p[0] / 1000 for p in run["answers"]] + [run["stages"][-1]["examples"] / 1000]
                tests = [100 * p[3] for p in run["answers"]]
                ax.step(moments, tests + tests[-1:], where="post", color=colours[run["arm"]], alpha=0.8,
                        label=once(ax, f"{arm_label(run)} (seeds; dots: the stops)"))
                ax.plot([s["examples"] / 1000 for s in stages], [100 * s["test"] for s in stages], marker="o",
                        linestyle="none", color=colours[run["arm"]], alpha=0.8)
                continue
            marker, dash = seed_style(run)
            ax.plot([s["examples"] / 1000 for s in stages], [100 * s["test"] for s in stages], marker=marker,
                    linestyle=dash, color=colours[run["arm"]], alpha=0.8,
                    label=once(ax, f"{arm_label(run)} (marker: seed)"))
            if stages:
                ax.annotate(f"seed {run['seed']}", (stages[-1]["examples"] / 1000, 100 * stages[-1]["test"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points", color=colours[run["arm"]])
            if all("untested_test" in s for s in stages):  # the same run's answer without the paired answer rule
                ax.plot([s["examples"] / 1000 for s in stages], [100 * s["untested_test"] for s in stages],
                        marker="x", linestyle=":", color=colours[run["arm"]], alpha=0.6,
                        label=once(ax, "its answer by best confirmed dev (seeds)"))
            last = run["stages"][-1]
            if "confirmed_test" in last:  # the answer after confirming the 5 best estimates on the whole dev set
                ax.plot([last["examples"] / 1000, last["confirmed_examples"] / 1000],
                        [100 * last["test"], 100 * last["confirmed_test"]], linestyle=":", marker="*",
                        markersize=10, color="tab:red", label=once(ax, "anchor + confirm (seeds)"))
        ax.axhline(100 * result["references"]["ties (fixed)"], color="grey", linestyle="--", label="ties (fixed)")
        full = [r["stages"][-1]["examples"] for r in result["runs"] if r["search"] == search and r["arm"] == "full"
                and r.get("answers")]
        if full:  # the "equal with a fifth of the examples": where the cheap arms must be level by
            ax.axvline(statistics.median(full) / 5000, color="black", linestyle=":",
                       label="a fifth of full's examples")
        if search == "evolver" and "linear (fixed)" in result["references"]:  # the plain Evolver's goal: averaging
            ax.axhline(100 * result["references"]["linear (fixed)"], color="black", linestyle=":",
                       label="linear (fixed): averaging")
        stops = max(len(r["stages"]) for r in result["runs"])
        when = "one stop, at the end" if stops == 1 else f"{stops} stops along it"
        ax.set(title=f"{setting}: {search}\n{result['budget']:.0f} s per run, {when}",
               xlabel="dev examples scored (thousands)", ylabel="answer's test score (%)")
        ax.legend(fontsize=7, framealpha=0.6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["minilm-cross-task"])
    parser.add_argument("--searches", nargs="+", default=DEFAULT_SEARCHES, choices=list(SEARCHES), help=(
        "layerwise-cma and ties-evolver by default; global-cma (one weight and density per expert) and evolver "
        "(the plain Evolver) for the issue's 60-minute goals; ties-evolver-f0.1: the TIES_Evolver with F = 0.1; "
        "method-search: the merge method searched too (beyond.py's), a space where the search gains more than "
        "dev's noise"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of search per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help=(
        "the first seed: runs with fresh seeds judge a rule chosen on earlier runs' (--first-seed 3 --seeds 3)"))
    parser.add_argument("--fraction", type=float, default=0.2, help="share of dev the estimated arm scores")
    parser.add_argument("--fidelities", type=int, nargs="+", help=(
        "examples per task at which the raced arm tests a trial (default 50 100 200; smollm2-tasks 25 50)"))
    parser.add_argument("--references", type=int, default=REFERENCES, help=(
        "the mixture arm's first trials scored on the whole dev set (objective.estimate.references); 0: the "
        "estimator fitted on the baselines alone. Another count is another study in --workdir and its own row in "
        "the table"))
    parser.add_argument("--stages", type=int, default=3, help="stops along the budget where the answer is scored")
    parser.add_argument("--answers", action="store_true", help=(
        "also score on test every answer the full and mixture-promote runs had (each change of their best whole-dev "
        "trial), for their answer against dev examples scored at every moment, and print each mixture-promote run "
        "at a fifth of its seed's full-run examples and at its end against the full run's end"))
    parser.add_argument("--jobs", type=int, default=1, help=(
        "runs at a time; above 1 each runs in its own process on one CPU thread (every arm alike, so each run's "
        "budget is spent under the same load)"))
    parser.add_argument("--workdir", type=Path, default=Path("out/fitness_cost"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="fitness_search", help=(
        "the results' file names under --out (NAME.json, NAME.png): another name keeps runs at another budget apart"))
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs: at least 1, got {args.jobs}")
    if args.references < 0:
        parser.error(f"--references: 0 or more, got {args.references}")
    quiet()
    results: dict[str, Any] = {}
    for setting in args.settings:
        folder = args.workdir / setting
        base = reference(folder, setting)
        rows = {r["name"]: r for r in base.user_attrs["evoopt:baselines"]}
        # the best source as the baselines chose it: by dev, in the study's direction (never by test)
        best_source = next(r for name, r in rows.items() if name.startswith("best source ("))
        references = {"ties (fixed)": rows["ties (fixed)"]["test_value"], "best source": best_source["test_value"],
                      "linear (fixed)": rows["linear (fixed)"]["test_value"]}
        references_dev = {name: rows[name]["dev_value"] for name in ("ties (fixed)", "linear (fixed)")}
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        # (the answer rules choose among trials; an Evolver's answer is its population's: refused there)
        jobs = [(folder, setting, search, arm, seed, args) for seed in seeds for search in args.searches
                for arm in args.arms if not (search in EVOLVERS and arm in ("mixture-paired", "mixture-promote"))]
        if args.jobs == 1:
            runs = [one_run(*job) for job in jobs]
        else:
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
                runs = [f.result() for f in [pool.submit(one_run, *job, threads=1) for job in jobs]]
        runs = kept_runs(args.out / f"{args.name}.json", setting, args, runs) + runs
        runs.sort(key=lambda r: (list(SEARCHES).index(r["search"]), ARMS.index(r["arm"]), r.get("references") or 0,
                                 r["seed"]))
        results[setting] = {"budget": args.budget, "fraction": args.fraction, "data": data_rules(),
                            "references": references,
                            "references_dev": references_dev,
                            "runs": runs, "summary": summarise(runs)}
        print(f"\n{setting}: {args.budget:.0f} s per run, {args.seeds} seeds; test: fixed TIES "
              f"{references['ties (fixed)']:.4f}, linear {references['linear (fixed)']:.4f}, best source "
              f"{references['best source']:.4f}")
        width = max(24, *(len(row["arm"]) + 2 for row in results[setting]["summary"]))
        print(f"{'search':<19}{'arm':<{width}}{'trials':>8}{'dev examples':>14}{'answer dev':>12}{'answer test':>13}"
              f"{'test min-max':>16}")
        for row in results[setting]["summary"]:
            low, high = row["test_range"]
            print(f"{row['search']:<19}{row['arm']:<{width}}{row['trials']:>8.0f}{row['examples']:>14,.0f}"
                  f"{row['dev']:>12.4f}{row['test']:>13.4f}{f'{low:.4f}-{high:.4f}':>16}")
        maximize = base.direction == optuna.study.StudyDirection.MAXIMIZE
        for run in (r for r in runs if r.get("curve")):  # how fast each run matched fixed TIES on dev
            at = reached(run["curve"], references_dev["ties (fixed)"], maximize)
            generations = run.get("cma_generations")
            print(f"  {run['search']} {run['arm']} seed {run['seed']}: fixed TIES's dev score "
                  f"{references_dev['ties (fixed)']:.4f} " + (f"reached after {at:,.0f} dev examples" if at is not None
                                                               else "never reached")
                  + (f"; CMA-ES generations {generations}" if generations is not None else ""))
        results[setting]["equal_time"] = matched = equal_time(runs, maximize)
        for row in matched:
            print(f"  {row['search']} {row['arm']} seed {row['seed']} at about equal total time: stop {row['stop']} "
                  f"({row['seconds']} s) test {row['test']:.4f} against full's end ({row['full_seconds']} s) "
                  f"{row['full_test']:.4f}: {row['gain_points']:+.2f} points")
        for search, arm in dict.fromkeys((r["search"], r["arm"]) for r in matched):
            gains = [r["gain_points"] for r in matched if (r["search"], r["arm"]) == (search, arm)]
            print(f"  {search} {arm} at about equal total time: median {statistics.median(gains):+.2f} points "
                  f"over {len(gains)} seeds")
        results[setting]["fifth"] = fifths = fifth(runs, maximize)
        for row in fifths:
            early = "no answer yet" if row["fifth_test"] is None else \
                f"test {row['fifth_test']:.4f} ({row['fifth_gain_points']:+.2f} points)"
            print(f"  {row['search']} {row['arm']} seed {row['seed']} against full's end ({row['full_examples']:,} "
                  f"examples, test {row['full_test']:.4f}): at a fifth of them {early}; at its end "
                  f"({row['end_examples']:,}) test {row['end_test']:.4f} ({row['end_gain_points']:+.2f} points)")
        for search, arm in dict.fromkeys((r["search"], r["arm"]) for r in fifths):
            mine = [r for r in fifths if (r["search"], r["arm"]) == (search, arm)]
            gains = [r["fifth_gain_points"] if r["fifth_gain_points"] is not None else -math.inf for r in mine]
            print(f"  {search} {arm}: median {statistics.median(gains):+.2f} points at a fifth of full's examples, "
                  f"{statistics.median(r['end_gain_points'] for r in mine):+.2f} at its end, over {len(mine)} seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    results = write_merged(args.out / f"{args.name}.json", results)
    plot(results, args.out / f"{args.name}.png")
    print(f"\nwrote {args.out / args.name}.json and .png")


if __name__ == "__main__":
    main()
