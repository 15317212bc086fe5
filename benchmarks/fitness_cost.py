"""Estimated fitness: how well a few dev examples stand for the whole dev set, on real merge candidates.

Per setting (``--settings``; the MiniLM ones scored by evoopt's dev scorer, smollm2-tasks through lm-eval on
its local multiple-choice tasks, 100 dev examples per task): the baselines (the sources, linear, task
arithmetic, TIES, DARE-TIES) are scored on dev with their per-example outcomes kept; then two real searches
with full-dev fitness draw the candidates, each trial keeping its per-example outcomes: layer-wise TIES with
evoopt's CMA-ES (``--cma`` trials) and TIES_Evolver (``--evolver`` trials). Every figure below is
then computed from the stored outcomes, without scoring anything again:

- the size of a trial's stored per-example outcomes (median JSON bytes);
- the candidates' spread (standard deviation and range of their full-dev scores) and the split-half
  Kendall tau of dev itself (two random disjoint halves of each task's examples; median of 20);
- per estimator (anchor points; strata: anchor points over the examples the references disagree on, the
  others counted at their shared result; mixture: strata's examples, the candidate fitted as a mixture of the
  references and the other examples predicted; IRT with p-IRT; a random subset) and share of dev (5 %, 10 %, 20 %;
  random also 50 %): Kendall tau and mean absolute error of the estimated against the full-dev score
  over all candidates, each estimator fitted on the baselines' dev outcomes only (what a study does),
  median over ``--draws`` seeds of the subset; and what estimating costs: the estimator's fit (once per study)
  and one trial's estimate (once per trial), each a median in milliseconds, against the median time a
  candidate's whole-dev evaluation took (its trial's ``eval_seconds``, measured in the same run).

With ``--references N`` (default 20) every estimator is also fitted on the baselines and the first N
candidates (``objective.estimate.references``: a study's first N trials scored on the whole dev set) and
judged on the other candidates, beside a random 50 % subset on those same candidates; and, for anchor points,
strata and mixture at 10 % of dev, with the first 10, 20, 30 and 40 candidates as references
(``references_sweep``: what more reference trials buy). Examples chosen with
hindsight (``hindsight``, 10 % and 20 %; greedy and at their own weights, so no bound: anchor points can pass it):
the examples chosen by forward selection to rank half of those other candidates from their own full-dev
outcomes, judged on the rest, beside a random 50 % subset there.
A run of some settings replaces their figures in ``--out``/fitness_cost.json and keeps the others.

The goal (issue 16): at 10 % of dev an estimator ranks candidates at least as well as a random 50 %
subset (tau against full dev) in every setting, with a mean absolute error of at most 1 point.
The studies live in ``--workdir`` and are resumed by a second run (only the missing trials run).

    python benchmarks/fitness_cost.py [--settings minilm-sentiment-domains minilm-cross-task smollm2-tasks]
        [--cma 87] [--evolver 13] [--draws 10] [--references 20] [--workdir out/fitness_cost]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import transformers
from scipy.stats import kendalltau

from evoopt.data.estimate import METHODS as ESTIMATORS
from evoopt.data.estimate import fit_estimator
from evoopt.data.objective import combine
from evoopt.data.outcomes import OUTCOMES_ATTR, Outcomes, TaskOutcomes, trial_outcomes
from evoopt.data.settings import get_setting
from evoopt.models.io import atomic_write
from evoopt.study.config import StudyConfig, parse_config
from evoopt.study.fitness import PRECISION_ATTR
from evoopt.study.run import run_study
from evoopt.study.storage import baseline_outcomes

# each setting's objective: dev examples per task (None: all), test examples per task for reporting; the causal
# setting is scored through lm-eval on its local multiple-choice tasks
OBJECTIVES: dict[str, dict[str, Any]] = {
    "minilm-sentiment-domains": {"limit": None, "test_limit": 500, "max_length": 128},
    "minilm-cross-task": {"limit": 300, "test_limit": 500, "max_length": 128},
    "smollm2-tasks": {"kind": "lm-eval", "limit": 100, "test_limit": 200, "batch_size": 16},
}
FRACTIONS = (0.05, 0.1, 0.2)
# every estimator evoopt offers, and mixture on right-or-wrong outcomes alone (margins dropped: what it is on
# outcomes without them, lm-eval's, and what it was before margins were kept)
METHODS = (*ESTIMATORS, "mixture-bits")


def study_config(folder: Path, setting: str, name: str, trials: int, **overrides: Any) -> StudyConfig:
    data: dict[str, Any] = {
        "name": name, "setting": setting, "seed": 0, "trials": trials, "artifacts": str(folder),
        "objective": OBJECTIVES[setting],
        "baselines": ["sources", "linear", "task_arithmetic", "ties", "dare_ties"],
    }
    data.update(overrides)
    return parse_config(data)


def evolver_strategy(setting: str) -> str:
    """The Evolver's mutation for a setting: the paper's x_i + F (x_r1 - x_r2) needs three individuals; with two
    experts (smollm2-tasks), the authors' released code's x_i + F (x_ref - x_i)."""
    return "paper" if len(get_setting(setting).tasks) >= 3 else "released"


def candidates(folder: Path, setting: str, args: argparse.Namespace,
               ) -> tuple[list[Outcomes], list[Outcomes], dict[str, Any]]:
    """The baselines' dev outcomes (the estimators' references), the searches' candidates' outcomes, and the
    study's bfloat16 check on the sources (agreement with float32 and speed-up) with the median size of a
    trial's stored outcomes (JSON bytes; the issue: a few kB at most for 1,200 examples)."""
    layerwise = study_config(folder, setting, "layerwise-cma", args.cma,
                             space={"kind": "layerwise", "method": "ties", "layers_per_group": 2,
                                    "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}},
                             sampler={"name": "EvoCmaSampler", "options": {"x0": 0.5, "sigma0": 0.1667}})
    first = run_study(layerwise, report=False).study
    references = baseline_outcomes(first)
    check = first._storage.get_study_system_attrs(first._study_id).get(PRECISION_ATTR, {})
    print(f"{setting}: bfloat16 check on the sources: {check}")
    objective = {**layerwise.objective.model_dump(exclude={"estimate"}), "precision": check.get("precision", "float32")}
    evolver = study_config(folder, setting, "ties-evolver", args.evolver,
                           space={"kind": "evolver", "method": "ties", "fixed": {"weight": 1.0, "density": 0.5}},
                           sampler={"name": "EvolverSampler",
                                    "options": {"strategy": evolver_strategy(setting), "F": 0.5, "Cr": 0.5}},
                           baselines=[], objective=objective)
    second = run_study(evolver, report=False).study
    found, stored, seconds = [], [], []
    for study in (first, second):
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            outcomes = trial_outcomes(trial)
            if outcomes is not None:
                found.append(outcomes)
                stored.append(len(json.dumps(trial.system_attrs[OUTCOMES_ATTR])))  # what a trial keeps
                if "eval_seconds" in trial.user_attrs:
                    seconds.append(trial.user_attrs["eval_seconds"])
    check = {**check, "outcomes_bytes_per_trial": statistics.median(stored),
             "eval_seconds_per_trial": statistics.median(seconds) if seconds else None}
    return [references[name] for name in sorted(references)], found, check


def _value(scores: dict[str, float]) -> float:
    return combine(scores)


def split_half(candidates: list[Outcomes], draws: int) -> float:
    """Kendall tau between the candidates' scores on two random disjoint halves of dev (median over draws)."""
    taus = []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        halves: list[dict[str, np.ndarray]] = [{}, {}]
        for task, t in candidates[0].tasks.items():
            order = rng.permutation(t.ids)
            halves[0][task], halves[1][task] = order[: len(order) // 2], order[len(order) // 2:]
        a = [_value(c.select(halves[0]).scores()) for c in candidates]
        b = [_value(c.select(halves[1]).scores()) for c in candidates]
        taus.append(float(kendalltau(a, b)[0]))
    return statistics.median(taus)


def _bits(outcomes: Outcomes) -> Outcomes:
    """The outcomes without their margins."""
    return Outcomes(outcomes.metric, {task: TaskOutcomes(t.ids, t.values, t.weights)
                                      for task, t in outcomes.tasks.items()})


# the benchmark's variants of an evoopt estimator: (the estimator fitted, how every outcome is read first, the
# weights' combination set on it); any other method is evoopt's own, as it is
VARIANTS: dict[str, tuple[str, Callable[[Outcomes], Outcomes] | None, str | None]] = {
    "mixture-bits": ("mixture", _bits, None),  # margins dropped: right-or-wrong alone
    "mixture-simplex": ("mixture", None, "simplex"),  # on margins, the weights on the simplex: its first version
}


def fidelity(references: list[Outcomes], found: list[Outcomes], method: str, fraction: float,
             draws: int, groups: list[str] | None = None) -> dict[str, Any]:
    """How ``method`` (an evoopt estimator or one of ``VARIANTS``) at ``fraction`` of dev ranks and errs on the
    candidates ``found``, fitted on ``references`` (median over ``draws`` seeds). With ``groups`` (a label per
    candidate), also each group's mean signed error in points (``bias_points``: estimated minus whole-dev, over
    the draws)."""
    full = [_value(c.scores()) for c in found]
    fitted, read, combination = VARIANTS.get(method, (method, None, None))
    if read is not None:
        references, found = [read(r) for r in references], [read(c) for c in found]
    taus, errors, examples, fits, estimates = [], [], 0, [], []
    signed: dict[str, list[float]] = {}
    for seed in range(draws):
        started = time.perf_counter()
        estimator = fit_estimator(fitted, references, fraction=fraction, seed=seed)
        fits.append(time.perf_counter() - started)  # once per study, at its start
        if combination is not None:
            estimator.combination = combination
        estimated = []
        for candidate in found:  # once per trial: what estimation adds to scoring the trial's subset
            started = time.perf_counter()
            estimated.append(_value(estimator.estimate(candidate.select(estimator.rows))))
            estimates.append(time.perf_counter() - started)
        taus.append(float(kendalltau(estimated, full)[0]))
        errors.append(float(np.mean(np.abs(np.asarray(estimated) - full))))
        examples = estimator.size
        for label, got, whole in zip(groups or [], estimated, full):
            signed.setdefault(label, []).append(100 * (got - whole))
    result = {"method": method, "fraction": fraction, "examples": examples, "tau": statistics.median(taus),
              "tau_spread": [min(taus), max(taus)], "mae_points": 100 * statistics.median(errors),
              "fit_ms": 1000 * statistics.median(fits), "estimate_ms": 1000 * statistics.median(estimates)}
    if groups is not None:
        result["bias_points"] = {label: round(statistics.mean(v), 2) for label, v in sorted(signed.items())}
    return result


SWEPT = ("anchor", "strata", "mixture", "mixture-bits")  # the estimators of the references sweep, at 10 % of dev


def references_sweep(references: list[Outcomes], found: list[Outcomes], draws: int, measured: dict[str, Any],
                     counts: tuple[int, ...] = (10, 20, 30, 40)) -> list[dict[str, Any]]:
    """How the estimators at 10 % of dev gain from more reference trials: fitted on the baselines and the first N
    candidates, judged on the others, beside a random 50 % subset on those same candidates. ``measured``: the
    ``with_references`` figures, whose count is taken from them rather than computed again."""
    rows = []
    for n in counts:
        if n >= len(found) - 10:
            break
        if n == measured["trials"]:
            rows.append({"trials": n, "candidates": measured["candidates"], "random_50": measured["random_50"],
                         "estimators": [r for r in measured["estimators"] if r["method"] in SWEPT
                                        and r["fraction"] == 0.1]})
            continue
        fitted, judged = references + found[:n], found[n:]
        rows.append({"trials": n, "candidates": len(judged),
                     "random_50": fidelity(fitted, judged, "random", 0.5, draws),
                     "estimators": [fidelity(fitted, judged, m, 0.1, draws) for m in SWEPT]})
    return rows


def hindsight(found: list[Outcomes], fraction: float, splits: int = 4) -> dict[str, Any] | None:
    """Examples chosen with hindsight (greedy, so no bound on every subset): those chosen by forward selection to
    rank half of the candidates (their own full-dev outcomes, far more than a study's references), judged on the
    other half, beside a random 50 % of each task's examples on that half (median over random splits). Each chosen
    example counts with its weight in the full-dev score, so only the choice is fitted. Correctness outcomes only
    (None otherwise)."""
    tasks = list(found[0].tasks)
    if any(found[0].tasks[task].values.dtype != bool for task in tasks):
        return None
    full = np.asarray([_value(c.scores()) for c in found])
    columns, weights = [], []
    for task in tasks:
        ids = found[0].tasks[task].ids
        columns.append(np.stack([c.select({task: ids}).tasks[task].values for c in found]).astype(float))
        weights += [1.0 / (len(tasks) * len(ids))] * len(ids)
    y, w = np.concatenate(columns, axis=1), np.asarray(weights)
    k, rng = round(fraction * y.shape[1]), np.random.default_rng(0)
    chosen_taus, half_taus = [], []
    for _ in range(splits):
        order = rng.permutation(len(found))
        fit, test = order[: len(found) // 2], order[len(found) // 2:]
        a, b = np.triu_indices(len(fit), 1)
        pa, pb = fit[a], fit[b]
        concordant, moves = np.sign(full[pa] - full[pb]), (y[pa] - y[pb]) * w  # pairs of candidates x examples
        estimate, taken = np.zeros(len(found)), np.zeros(y.shape[1], dtype=bool)
        for _ in range(k):  # the example whose addition ranks the fit half best (tau-a)
            gain = (np.sign((estimate[pa] - estimate[pb])[:, None] + moves) * concordant[:, None]).sum(axis=0)
            best = int(np.argmax(np.where(taken, -np.inf, gain)))
            taken[best] = True
            estimate += y[:, best] * w[best]
        chosen_taus.append(float(kendalltau(estimate[test], full[test])[0]))
        judged = [found[i] for i in test]  # a random half of each task's examples, as the random estimator draws
        half_taus.append(fidelity(judged, judged, "random", 0.5, draws=10)["tau"])
    return {"fraction": fraction, "examples": k, "tau": statistics.median(chosen_taus),
            "random_50_tau": statistics.median(half_taus), "splits": splits,
            "contested_examples": int((y.std(axis=0) > 0).sum())}  # where the candidates do not all agree


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results)
    styles = dict(zip(METHODS, zip("o^sdvP", ("tab:blue", "tab:red", "tab:purple", "tab:orange", "tab:green",
                                               "tab:brown"))))
    assert len(styles) == len(METHODS), "a marker and a colour for every estimator"
    figure, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.8), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        result = results[setting]
        for method, (marker, colour) in styles.items():
            rows = [r for r in result["estimators"] if r["method"] == method]
            if not rows:  # (a setting measured before the estimator existed)
                continue
            ax.plot([100 * r["fraction"] for r in rows], [r["tau"] for r in rows], marker=marker, label=method,
                    color=colour)
            referenced = result.get("with_references")
            if referenced and method != "random":  # a random subset does not use the references
                rows = [r for r in referenced["estimators"] if r["method"] == method]
                ax.plot([100 * r["fraction"] for r in rows], [r["tau"] for r in rows], marker=marker,
                        linestyle="--", color=colour, label=f"{method} + first {referenced['trials']} trials")
        chosen = result.get("hindsight")
        if chosen:
            ax.plot([100 * r["fraction"] for r in chosen], [r["tau"] for r in chosen], "kx", markersize=9,
                    label="chosen with hindsight, own weights")
        ax.axhline(result["random_50"]["tau"], color="grey", linestyle="--", label="random 50 %")
        ax.axhline(result["split_half_tau"], color="black", linestyle=":", label="split halves of dev")
        ax.set(title=f"{setting}\n{result['candidates']} candidates, sd {result['spread_sd_points']:.1f} points",
               xlabel="% of dev scored", ylabel="Kendall tau against full dev", ylim=(0, 1))
    labels: dict[str, Any] = {}  # one legend for every panel, below them (the panels' lines stay visible)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    figure.legend(list(labels.values()), list(labels), loc="lower center", ncol=6, fontsize=8)
    figure.tight_layout(rect=(0, 0.16, 1, 1))
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--cma", type=int, default=87, help="layer-wise CMA-ES trials per setting")
    parser.add_argument("--evolver", type=int, default=13, help="TIES_Evolver trials per setting")
    parser.add_argument("--draws", type=int, default=10, help="seeds of each estimator's subset")
    parser.add_argument("--references", type=int, default=20,
                        help="also fit the estimators on the baselines and the first N candidates (0: no)")
    parser.add_argument("--workdir", type=Path, default=Path("out/fitness_cost"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results: dict[str, Any] = {}
    for setting in args.settings:
        references, found, check = candidates(args.workdir / setting, setting, args)
        full = [_value(c.scores()) for c in found]
        result = {"candidates": len(found), "references": len(references),
                  "dev_examples": found[0].size, "spread_sd_points": 100 * float(np.std(full)),
                  "range": [min(full), max(full)], "split_half_tau": split_half(found, 2 * args.draws),
                  "estimators": [fidelity(references, found, m, f, args.draws) for m in METHODS for f in FRACTIONS],
                  "random_50": fidelity(references, found, "random", 0.5, args.draws), "precision_check": check}
        if args.references:
            early, rest = found[: args.references], found[args.references:]
            result["with_references"] = {
                "trials": args.references, "candidates": len(rest),
                "estimators": [fidelity(references + early, rest, m, f, args.draws)
                               for m in METHODS for f in FRACTIONS],
                "random_50": fidelity(references + early, rest, "random", 0.5, args.draws)}
            result["references_sweep"] = references_sweep(references, found, args.draws, result["with_references"])
        result["hindsight"] = [h for f in (0.1, 0.2) if (h := hindsight(found[args.references:], f))]
        results[setting] = result
        print(f"\n{setting}: {len(found)} candidates (dev {result['dev_examples']} examples; full-dev scores "
              f"{result['range'][0]:.4f}..{result['range'][1]:.4f}, sd {result['spread_sd_points']:.2f} points); "
              f"split-half tau of dev {result['split_half_tau']:.2f}; random 50 %: tau "
              f"{result['random_50']['tau']:.2f}, MAE {result['random_50']['mae_points']:.2f} points; a trial's "
              f"outcomes take {check['outcomes_bytes_per_trial']:.0f} bytes stored")
        print(f"{'estimator':<13}{'share':>7}{'examples':>10}{'tau':>7}{'vs random 50 %':>16}{'MAE (points)':>14}")
        for row in result["estimators"]:
            ratio = row["tau"] / result["random_50"]["tau"] if result["random_50"]["tau"] else float("nan")
            print(f"{row['method']:<13}{100 * row['fraction']:>6.0f}%{row['examples']:>10}{row['tau']:>7.2f}"
                  f"{ratio:>16.2f}{row['mae_points']:>14.2f}")
        referenced = result.get("with_references")
        if referenced:
            r50 = referenced["random_50"]
            print(f"fitted on the baselines and the first {referenced['trials']} candidates, judged on the other "
                  f"{referenced['candidates']} (random 50 % there: tau {r50['tau']:.2f}, MAE {r50['mae_points']:.2f})")
            for row in referenced["estimators"]:
                ratio = row["tau"] / r50["tau"] if r50["tau"] else float("nan")
                print(f"{row['method']:<13}{100 * row['fraction']:>6.0f}%{row['examples']:>10}{row['tau']:>7.2f}"
                      f"{ratio:>16.2f}{row['mae_points']:>14.2f}")
        spent = check.get("eval_seconds_per_trial")
        for row in (referenced or result)["estimators"]:  # what estimating costs beside scoring
            if row["fraction"] == 0.1 and spent:
                print(f"{row['method']} at 10 %: fitted once in {row['fit_ms']:.1f} ms; a trial's estimate takes "
                      f"{row['estimate_ms']:.2f} ms, {100 * row['estimate_ms'] / 1000 / spent:.3f} % of a whole-dev "
                      f"trial's evaluation ({spent:.2f} s, median)")
        for sweep in result.get("references_sweep", []):
            r50 = sweep["random_50"]["tau"]
            print(f"with the first {sweep['trials']} candidates as references, at 10 % of dev on the other "
                  f"{sweep['candidates']} (random 50 % there: tau {r50:.2f}): " + ", ".join(
                      f"{row['method']} tau {row['tau']:.2f} ({row['tau'] / r50:.2f} x), MAE {row['mae_points']:.2f}"
                      for row in sweep["estimators"]))
        for row in result["hindsight"]:
            print(f"hindsight: {row['examples']} examples ({100 * row['fraction']:.0f} %) chosen with hindsight to "
                  f"rank half of the other candidates, judged on the rest: tau {row['tau']:.2f} (random 50 % there "
                  f"{row['random_50_tau']:.2f}; median of {row['splits']} splits; the candidates disagree on "
                  f"{row['contested_examples']} of {result['dev_examples']} dev examples)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fitness_cost.json"  # the settings run here replace theirs; the others are kept
    results = {**(json.loads(path.read_text()) if path.exists() else {}), **results}
    atomic_write(path, json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "fitness_cost.png")
    print(f"\nwrote {args.out / 'fitness_cost.json'} and {args.out / 'fitness_cost.png'}")


if __name__ == "__main__":
    main()
