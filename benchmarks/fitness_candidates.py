"""The estimators judged on a search's own candidates: the whole-dev trials of ``fitness_search.py``'s full arms.

``fitness_cost.py`` draws its candidates from layer-wise CMA-ES and the TIES_Evolver, all TIES merges like most
baselines. A search over other kinds of merge (the method search: DELLA, TSV-M, Iso-CTS) asks more of an estimator
fitted on those baselines. This reads the full arms' studies that ``fitness_search.py`` left in ``--workdir``
(``{search}-full-seed*``, every trial scored on the whole dev set with its per-example outcomes) and, per search
(``--searches``), scores nothing again: per estimator and share of dev, fitted on the setting's 8 baselines alone
(what ``--references 0`` does) and, at 10 %, also with seed 0's first 20 candidates as references (judged on the
others), Kendall tau and mean absolute error against the whole-dev score (median of ``--draws`` subsets), and the
mean signed error per merge method (``bias_points``: estimated minus whole-dev, in points); and per merge method the
median seconds a trial took to merge and to evaluate (``seconds``). ``mixture-simplex`` is
``mixture`` on margins with its weights on the simplex, as it was before they were allowed any non-negative sum.

    python benchmarks/fitness_candidates.py [--workdir out/fitness_cost] [--setting minilm-cross-task]
        [--searches method-search layerwise-cma] [--draws 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from fitness_cost import fidelity
from fitness_search import quiet, reference

from evoopt.data.estimate import fit_estimator
from evoopt.data.outcomes import Outcomes, trial_outcomes
from evoopt.study.storage import baseline_outcomes

ESTIMATORS = ("mixture", "mixture-simplex", "strata", "random")
REFERENCES = 20  # seed 0's first candidates as reference trials (objective.estimate.references' default)


def weight_sums(references: list[Outcomes], found: list[tuple[int, int, str, Outcomes]]) -> dict[str, float]:
    """Per merge method, the median sum of mixture's non-negative weights (20 % of dev, fitted on ``references``):
    how sure of its answers a candidate is against its references (1: on their scale)."""
    estimator, sums = fit_estimator("mixture", references, fraction=0.2, seed=0), {}
    for _, _, method, outcomes in found:
        for w in estimator.weights(outcomes).values():
            sums.setdefault(method, []).append(float(w.sum()))
    return {method: round(float(np.median(v)), 2) for method, v in sorted(sums.items())}


def full_trials(folder: Path, search: str) -> Iterator[tuple[int, optuna.trial.FrozenTrial]]:
    """(seed, trial) of every trial of the search's full arms' studies in ``folder``."""
    for path in sorted(folder.glob(f"{search}-full-seed*/evoopt.db")):
        seed, storage = int(path.parent.name.rsplit("seed", 1)[1]), f"sqlite:///{path}"
        for name in optuna.get_all_study_names(storage):
            for trial in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
                yield seed, trial


def candidates(trials: list[tuple[int, optuna.trial.FrozenTrial]], search: str) -> list[tuple[int, int, str, Outcomes]]:
    """(seed, trial number, merge method, whole-dev outcomes) of every scored trial of the search's full arms."""
    found = []
    for seed, trial in trials:
        outcomes = trial_outcomes(trial)
        if outcomes is not None and trial.value is not None and "estimated" not in trial.user_attrs:
            found.append((seed, trial.number, str(trial.params.get("method", search)), outcomes))
    return found


def trial_seconds(trials: list[tuple[int, optuna.trial.FrozenTrial]], search: str) -> dict[str, dict[str, float]]:
    """Per merge method, the median ``merge_seconds`` and ``eval_seconds`` of the full arms' whole-dev trials (what
    a candidate costs there, beside what its evaluation costs)."""
    seconds: dict[str, dict[str, list[float]]] = {}
    for _, trial in trials:
        if "merge_seconds" in trial.user_attrs and "eval_seconds" in trial.user_attrs:
            per = seconds.setdefault(str(trial.params.get("method", search)), {"merge": [], "eval": []})
            per["merge"].append(float(trial.user_attrs["merge_seconds"]))
            per["eval"].append(float(trial.user_attrs["eval_seconds"]))
    return {method: {k: round(float(np.median(v)), 2) for k, v in per.items()} | {"trials": len(per["merge"])}
            for method, per in sorted(seconds.items())}


def judge(references: list[Outcomes], found: list[tuple[int, int, str, Outcomes]], draws: int) -> dict[str, Any]:
    outcomes, groups = [c[3] for c in found], [c[2] for c in found]
    rows = [fidelity(references, outcomes, method, fraction, draws, groups)
            for fraction in (0.1, 0.2) for method in ESTIMATORS]
    rows.append(fidelity(references, outcomes, "random", 0.5, draws, groups))
    first = [c for c in found if c[0] == 0 and c[1] < REFERENCES]
    judged = [c for c in found if not (c[0] == 0 and c[1] < REFERENCES)]
    with_references = [fidelity(references + [c[3] for c in first], [c[3] for c in judged], method, fraction, draws,
                                [c[2] for c in judged])
                       for method, fraction in (("mixture", 0.1), ("mixture-simplex", 0.1), ("random", 0.5))]
    return {"candidates": len(found), "seeds": sorted({c[0] for c in found}), "baselines_alone": rows,
            "weight_sums": weight_sums(references, found),
            "with_references": {"trials": len(first), "candidates": len(judged), "estimators": with_references}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("out/fitness_cost"), help="fitness_search.py's")
    parser.add_argument("--setting", default="minilm-cross-task")
    parser.add_argument("--searches", nargs="+", default=["method-search", "layerwise-cma"])
    parser.add_argument("--draws", type=int, default=5, help="seeds of each estimator's subset")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    quiet()
    folder = args.workdir / args.setting
    stored = baseline_outcomes(reference(folder, args.setting))
    references = [stored[name] for name in sorted(stored)]
    results: dict[str, Any] = {}
    for search in args.searches:
        trials = list(full_trials(folder, search))
        found = candidates(trials, search)
        if not found:
            raise SystemExit(f"--searches: no full-arm studies of {search!r} under {folder}; run fitness_search.py "
                             f"--searches {search} --arms full there first")
        results[search] = result = judge(references, found, args.draws)
        print(f"\n{args.setting}, {search}: {result['candidates']} whole-dev candidates (seeds {result['seeds']}), "
              f"estimators fitted on the {len(references)} baselines; tau (MAE in points), bias per method")
        extra = result["with_references"]
        rows = [(row, "") for row in result["baselines_alone"]] + [
            (row, f", +{extra['trials']} refs") for row in extra["estimators"]]
        for row, note in rows:
            bias = ", ".join(f"{k} {v:+.1f}" for k, v in row["bias_points"].items())
            print(f"  {row['method'] + note:<26}{100 * row['fraction']:>4.0f} %  {row['tau']:.2f} "
                  f"({row['mae_points']:.2f})  {bias}")
        print(f"  median sum of mixture's weights per method (20 %): {result['weight_sums']}")
        result["seconds"] = trial_seconds(trials, search)
        print("  a whole-dev trial's median seconds per method (merge, evaluation): " + ", ".join(
            f"{method} {t['merge']:.1f} + {t['eval']:.1f} ({t['trials']})" for method, t in result["seconds"].items()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fitness_candidates.json"
    from evoopt.models.io import atomic_write

    atomic_write(path, json.dumps({args.setting: results}, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
