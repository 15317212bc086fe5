"""Parameter-space search on the MiniLM sentiment domains: which space and sampler, for one budget.

The four VADER-domain MiniLM experts and their base (``minilm-sentiment-domains``), the dev
objective (mean accuracy over the domains on a fixed, seeded subset of ``--limit`` examples
each), one evaluation budget (``--trials``), several seeds. Measured in one run:

  (a) TIES and DARE-TIES with default coefficients (weight 1, density 0.5; no search);
  (b) global per-model weight and density, searched with evoopt's CMA-ES (what OptunaHub's
      evo_merge searches: one coefficient per model);
  (c) layer-wise weight and density (embeddings, pairs of blocks, head: 40 parameters),
      evoopt's CMA-ES (Akiba et al. 2024: x0 = 0.5, sigma0 = 1/6);
  (d) the same layer-wise space with Optuna's CmaEsSampler, TPE and random search.

For each: the best dev score and that trial's test score (``--test-limit`` examples per
domain; test is never seen by the search), median over seeds; best-so-far curves (median
over seeds) against trials, saved as a PNG; and how many evaluations (c) needs to reach the
median final dev score of each (d) sampler. Machines are noisy: the scores are what counts,
not the seconds (none are printed).

    python benchmarks/ps_search.py [--trials 50] [--seeds 3] [--limit 50] [--test-limit 500]
                                   [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
import transformers

from evoopt.data.objective import combine
from evoopt.models.io import atomic_write
from evoopt.study.config import StudyConfig, parse_config
from evoopt.study.run import run_baselines, run_study
from evoopt.study.storage import data_rules

SETTING = "minilm-sentiment-domains"
SEARCH = {"weight": [0.0, 1.0], "density": [0.1, 1.0]}
RUNS: dict[str, tuple[str, dict[str, Any]]] = {  # label -> (space kind, sampler spec)
    "(b) global, evoopt CMA-ES": ("global", {"name": "EvoCmaSampler"}),
    "(c) layer-wise, evoopt CMA-ES": ("layerwise", {"name": "EvoCmaSampler"}),
    "(d) layer-wise, Optuna CmaEsSampler": ("layerwise", {"name": "CmaEsSampler"}),
    "(d) layer-wise, TPE": ("layerwise", {"name": "TPESampler", "options": {"multivariate": True}}),
    "(d) layer-wise, random": ("layerwise", {"name": "RandomSampler"}),
}


def config(folder: Path, name: str, kind: str, sampler: dict[str, Any], args: argparse.Namespace, seed: int,
           **extra: Any) -> StudyConfig:
    space: dict[str, Any] = {"kind": kind, "method": "ties", "search": SEARCH}
    if kind == "layerwise":
        space["layers_per_group"] = 2
    return parse_config({
        "name": name, "setting": SETTING, "space": space, "sampler": sampler, "seed": seed,
        "objective": {"limit": args.limit, "test_limit": args.test_limit, "max_length": 64},
        "trials": args.trials, "artifacts": str(folder), "baselines": [], **extra,
    })


def fixed_merges(folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """(a): the baselines TIES and DARE-TIES, scored like the searches' best trials."""
    rows = run_baselines(config(folder, "fixed", "global", {"name": "RandomSampler"}, args, 0,
                                baselines=["ties", "dare_ties"]))
    return [{"label": f"(a) {row['name']}", "dev": [row["dev_value"]], "test": [row["test_value"]], "curves": []}
            for row in rows]


def search(folder: Path, label: str, args: argparse.Namespace) -> dict[str, Any]:
    kind, sampler = RUNS[label]
    devs, tests, curves = [], [], []
    for seed in range(args.seeds):
        study_config = config(folder, f"{label.split()[0][1]}-{sampler['name']}-{kind}-{seed}", kind, sampler,
                              args, seed)
        study = run_study(study_config, baselines=False).study
        values = [t.value for t in study.get_trials(deepcopy=False) if t.value is not None]
        curves.append([max(values[: i + 1]) for i in range(len(values))])
        best = study.best_trial
        test = study.user_attrs["evoopt:test"][str(best.number)]["test"]
        devs.append(best.value)
        tests.append(combine(test, study_config.objective.weights))
        print(f"  {label} seed {seed}: best dev {best.value:.4f} (trial {best.number}), test {tests[-1]:.4f}",
              flush=True)
    return {"label": label, "dev": devs, "test": tests, "curves": curves}


def median_curve(curves: list[list[float]]) -> list[float]:
    length = min(len(c) for c in curves)
    return [statistics.median(c[i] for c in curves) for i in range(length)]


def reach(curves: list[list[float]], target: float) -> str:
    """Median evaluations needed to reach ``target`` (runs that never do count as never)."""
    needed = [next((i + 1 for i, v in enumerate(c) if v >= target), None) for c in curves]
    reached = sorted(n for n in needed if n is not None)
    if len(reached) * 2 <= len(needed):  # the median run did not get there
        return f"not reached by most seeds ({len(reached)}/{len(needed)})"
    return f"{statistics.median([n if n is not None else float('inf') for n in needed]):.0f}"


def plot(results: list[dict[str, Any]], out: Path, trials: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.5, 5))
    for result in results:
        if result["curves"]:
            curve = median_curve(result["curves"])
            ax.plot(range(1, len(curve) + 1), curve, label=result["label"])
        else:
            ax.axhline(statistics.median(result["dev"]), linestyle=":", color="grey")
            ax.annotate(result["label"], (trials, statistics.median(result["dev"])), ha="right", va="bottom",
                        fontsize=8, color="grey")
    ax.set_xlabel("evaluations (trials)")
    ax.set_ylabel("best dev accuracy so far (median over seeds)")
    ax.set_title(f"{SETTING}: TIES coefficient search")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not over them
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50, help="evaluations per search (default 50)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=50, help="dev examples per domain (default 50)")
    parser.add_argument("--test-limit", type=int, default=500, help="test examples per domain (default 500)")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help="which searches (labels)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = fixed_merges(Path(tmp), args)
        for label in args.runs:
            results.append(search(Path(tmp), label, args))
    print(f"\n{SETTING}: {args.trials} evaluations, {args.seeds} seeds, dev {args.limit} / test {args.test_limit} "
          "examples per domain; medians over seeds (min-max)")
    print(f"{'search':42s} {'best dev':>22s} {'its test':>22s}")
    for r in results:
        dev, test = r["dev"], r["test"]
        print(f"{r['label']:42s} {statistics.median(dev):>8.4f} ({min(dev):.4f}-{max(dev):.4f}) "
              f"{statistics.median(test):>8.4f} ({min(test):.4f}-{max(test):.4f})")
    ours = next((r for r in results if r["label"].startswith("(c)")), None)
    if ours is not None:
        for r in results:
            if r["label"].startswith("(d)"):
                target = statistics.median(r["dev"])
                print(f"(c) evaluations to reach {r['label'][4:]}'s final {target:.4f}: "
                      f"{reach(ours['curves'], target)} of {args.trials}")
    plot(results, args.out / "ps_search.png", args.trials)
    atomic_write(args.out / "ps_search.json", json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "data": data_rules(), "results": results}, indent=1))
    print(f"plot: {args.out / 'ps_search.png'}; data: {args.out / 'ps_search.json'}")


if __name__ == "__main__":
    main()
