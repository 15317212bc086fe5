"""Beyond the anchors: the newest data-free merges and searches, at the same number of evaluations.

Per setting (``--settings``, default minilm-cross-task: per-task heads, where fixed TIES leaves room):

- fixed merges, one evaluation each, with their usual settings: TIES and DARE-TIES (weight 1, density .5),
  DELLA (density .5, epsilon .1), SCE (mergekit's defaults), TSV-M and Iso-CTS (weight 1, FusionBench's
  default; the Iso-CTS authors tune the scale on validation data);
  beside the average of the experts and the task-specific experts (each on its own task);
- searches, each given ``--evaluations`` trials scored on the whole dev set, ``--seeds`` seeds: the method
  search (evoopt's CMA-ES, one per method, methods raced), layer-wise TIES with evoopt's CMA-ES,
  TIES_Evolver, M2N2 (archive ``--archive``), from the experts and with their TIES merge as one more
  first member (``space.seeds``), and TSV-M's and Iso-CTS's per-model weights searched (first at weight 1,
  Iso-CTS's bounds up to 6 so that the weights also act as its scale); each
  answer (the best trial, the Evolver's population answer, M2N2's best member by dev) is scored on test after
  its search, for reporting only.

Printed and written (``--out``): the table (median test over seeds with min-max, dev, gap closed between the
average of the experts and the task-specific experts), the issue's goals checked, and a plot of the best
dev score so far against evaluations per search beside the answers' test scores. Runs go ``--jobs`` at a
time (one CPU thread each); a rerun resumes every run from its study in ``--workdir``. ``--estimate anchor``
scores the searches' trials on ``--fraction`` of dev with the estimated fitness of ``objective.estimate``
(fitted on the baselines' dev outcomes; every search alike, so the evaluations stay equal and each costs a
fraction of one on the whole dev set); the answers are still scored on the whole dev and test sets. A setting's
results replace its own entry in ``beyond.json``; the other settings' are kept.

    python benchmarks/beyond.py [--settings minilm-cross-task] [--evaluations 30] [--seeds 3] [--jobs 2]
        [--archive 8] [--estimate anchor --fraction 0.2] [--precision float32] [--iso-scales 1 2 3 4 5 6]
        [--workdir out/beyond]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import optuna
from fitness_cost import evolver_strategy, study_config
from fitness_search import answer, copy_baselines, quiet, write_merged

from evoopt.data.estimate import METHODS as ESTIMATORS
from evoopt.data.objective import combine
from evoopt.study.fitness import PRECISION_ATTR
from evoopt.study.run import open_study, run_baselines, run_study
from evoopt.study.storage import FINISHED, best_trial

FIXED = ["ties", "dare_ties", "della", "sce", "tsv", "iso_cts"]
SEARCHES: dict[str, dict[str, Any]] = {
    "method search": {"space": {"kind": "methods"}, "sampler": {"name": "EvoCmaSampler",
                                                                "options": {"sigma0": 0.1667}}},
    "layer-wise CMA-ES": {
        "space": {"kind": "layerwise", "method": "ties", "layers_per_group": 2,
                  "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}},
        "sampler": {"name": "EvoCmaSampler", "options": {"x0": 0.5, "sigma0": 0.1667}}},
    "TIES_Evolver": {
        "space": {"kind": "evolver", "method": "ties", "fixed": {"weight": 1.0, "density": 0.5}},
        "sampler": {"name": "EvolverSampler", "options": {"strategy": "paper", "F": 0.5, "Cr": 0.5}}},
    "M2N2": {"space": {"kind": "m2n2"}, "sampler": {"name": "M2N2Sampler", "options": {}}},
    "M2N2 + TIES seed": {"space": {"kind": "m2n2", "seeds": ["ties"]}, "sampler": {"name": "M2N2Sampler",
                                                                                 "options": {}}},
    # TSV-M's per-model weights searched (its basis is cached, so a candidate costs what TIES does): the method
    # search with TSV-M alone, first at the paper's weight 1, then evoopt's CMA-ES from the middle of its bounds
    "TSV-M, weights searched": {
        "space": {"kind": "methods", "methods": {"tsv": {"search": {"weight": [0.0, 1.5]}, "start": {"weight": 1.0}}}},
        "sampler": {"name": "EvoCmaSampler", "options": {"sigma0": 0.1667}}},
    # Iso-CTS's per-model weights searched: its flat spectrum sits at the mean singular value, far below the top
    # ones, so it wants a larger scale than task arithmetic's (the authors tune it on validation data); the
    # weights scale the spectrum, so bounds up to 6 let them act as that scale too. First the paper's weight 1.
    "Iso-CTS, weights searched": {
        "space": {"kind": "methods", "methods": {"iso_cts": {"search": {"weight": [0.0, 6.0]},
                                                             "start": {"weight": 1.0}}}},
        "sampler": {"name": "EvoCmaSampler", "options": {"sigma0": 0.1667}}},
}


def baseline_config(folder: Path, setting: str) -> Any:
    """The setting's study of the fixed merges and the sources (their rows and per-example dev outcomes)."""
    return study_config(folder / "baselines", setting, "baselines", 1, baselines=["sources", "linear", *FIXED])


def baselines(folder: Path, setting: str) -> tuple[list[dict[str, Any]], str, float]:
    """The fixed merges and the sources, scored once per setting (stored: a rerun reads them); the precision and
    the study's sign (+1 where scores are maximised, -1 where minimised, as perplexity)."""
    config = baseline_config(folder, setting)
    study = open_study(config)
    if "evoopt:baselines" not in study.user_attrs:
        run_baselines(config, study=study)
    precision = study._storage.get_study_system_attrs(study._study_id).get(PRECISION_ATTR, {})
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return study.user_attrs["evoopt:baselines"], precision.get("precision", "float32"), sign


def references(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Rows by name (dev, test), with the task-specific experts: each task scored by its own expert (the source
    named after it; ``trec-coarse_gen`` is the ``trec-coarse`` expert's too), averaged over every task of the
    objective, as the merges' scores are."""
    by_name = {r["name"]: {"dev": r["dev_value"], "test": r["test_value"]} for r in rows}
    sources = {r["name"].removeprefix("source "): r for r in rows if r["name"].startswith("source ")}

    def owner(task: str) -> dict[str, Any]:
        return next(r for name, r in sources.items() if task == name or task.startswith(f"{name}_"))

    tasks = list(next(iter(sources.values()))["dev"])
    by_name["task-specific experts"] = {split: statistics.mean(owner(task)[split][task] for task in tasks)
                                        for split in ("dev", "test")}
    return by_name


def one_run(folder: str, setting: str, search: str, seed: int, evaluations: int, precision: str,
            archive: int, estimate: dict[str, Any] | None = None) -> dict[str, Any]:
    """One search, one seed, in a worker process of one thread; ``estimate``: the trials' fitness estimated
    from a few dev examples (``objective.estimate``, fitted on the baselines' dev outcomes)."""
    import torch

    torch.set_num_threads(1)
    quiet()
    name = f"{search.replace(' ', '-').replace('_', '-').lower()}-seed{seed}"
    if estimate:
        name += f"-{estimate['method']}{round(100 * estimate['fraction'])}"
    spec = json.loads(json.dumps(SEARCHES[search]))
    if search.startswith("M2N2"):
        spec["sampler"]["options"]["archive"] = archive
    if search == "TIES_Evolver":
        spec["sampler"]["options"]["strategy"] = evolver_strategy(setting)
    defaults = study_config(Path(folder), setting, "x", 1).objective.model_dump(exclude={"estimate"})
    objective = {**defaults, "precision": precision, **({"estimate": estimate} if estimate else {})}
    config = study_config(Path(folder) / name, setting, name, evaluations, seed=seed,
                          baselines=["sources", "linear", *FIXED] if estimate else [], objective=objective, **spec)
    started = time.perf_counter()
    if estimate:  # the estimator's references: the baselines' per-example dev outcomes
        copy_baselines(open_study(baseline_config(Path(folder), setting)), open_study(config))
    study = run_study(config, baselines=False).study
    seconds = time.perf_counter() - started
    trials = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number)
    found = answer(study)
    assert found is not None, f"{name}: no answer"
    values = [t.value for t in trials if t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE  # (the settings here: accuracy)
    search_seconds = sum(t.duration.total_seconds() for t in trials if t.duration is not None)
    return {"search": search, "seed": seed, "trials": len(trials), "seconds": round(search_seconds, 1),
            "run_seconds": round(seconds, 1),  # this call's: a resumed run's is only what was left
            "best_so_far": [(max if maximize else min)(values[: k + 1]) for k in range(len(values))],
            "dev": combine(found["dev"]), "test": combine(found["test"]), "weights": answer_weights(study, search)}


def answer_weights(study: optuna.Study, search: str) -> dict[str, float] | None:
    """The answer's searched coefficients, for the single-method searches (a handful: one weight per expert)."""
    best = best_trial(study)
    if not search.endswith("weights searched") or best is None or "evoopt:result" in study.user_attrs:
        return None
    return {name: round(value, 3) for name, value in best.params.items() if isinstance(value, float)}  # (not the
    # method search's choice of method, a string, which a one-method search has too)


def iso_scale(folder: str, setting: str, scale: float, precision: str) -> dict[str, Any]:
    """Iso-CTS with every weight at ``scale`` (the weights scale its flat spectrum: the same as its scale), scored
    on dev only: the first trial of a method-search study over Iso-CTS alone that starts there."""
    import torch

    torch.set_num_threads(1)
    quiet()
    name = f"iso-cts-scale-{scale:g}"
    space = {"kind": "methods", "methods": {"iso_cts": {"search": {"weight": [0.0, max(6.0, scale)]},
                                                        "start": {"weight": scale}}}}
    defaults = study_config(Path(folder), setting, "x", 1).objective.model_dump(exclude={"estimate"})
    config = study_config(Path(folder) / name, setting, name, 1, baselines=[], space=space,
                          objective={**defaults, "precision": precision}, sampler={"name": "EvoCmaSampler"})
    trial = run_study(config, baselines=False, report=False).study.trials[0]
    return {"scale": scale, "dev": trial.value}


def summarise(runs: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    low, high = refs["average of sources"]["test"], refs["task-specific experts"]["test"]
    rows = []
    for name, key in [("average of the experts", "average of sources"),
                      ("task-specific experts (each on its own task)", "task-specific experts"),
                      *[(f"{m} (fixed)", f"{m} (fixed)") for m in FIXED]]:
        ref = refs[key]
        rows.append({"name": name, "evaluations": 1 if "fixed" in name else 0, "dev": ref["dev"],
                     "test": ref["test"], "test_range": None, "gap": (ref["test"] - low) / (high - low)})
    for search in SEARCHES:
        mine = [r for r in runs if r["search"] == search]
        if mine:
            tests = [r["test"] for r in mine]
            rows.append({"name": search, "evaluations": statistics.median(r["trials"] for r in mine),
                         "dev": statistics.median(r["dev"] for r in mine), "test": statistics.median(tests),
                         "test_range": [min(tests), max(tests)],
                         "gap": (statistics.median(tests) - low) / (high - low),
                         "seconds": statistics.median(r["seconds"] for r in mine)})
    return rows


def goals(rows: list[dict[str, Any]], sign: float) -> list[str]:
    """The issue's goals, checked on this run's figures (``sign``: +1 where higher scores are better, -1 where
    lower are; the gap closed is a fraction either way)."""
    by = {r["name"]: r for r in rows}
    searches = [r for r in rows if r["test_range"] is not None]
    lines = []
    for new in ("M2N2", "M2N2 + TIES seed", "method search", "TSV-M, weights searched", "Iso-CTS, weights searched"):
        if new not in by:
            continue
        others = [r for r in searches if r["name"] != new]
        spread = max(r["test_range"][1] - r["test_range"][0] for r in searches)
        margin = sign * by[new]["test"] - max(sign * r["test"] for r in others) if others else float("nan")
        lines.append(f"{new} beats every other search by {100 * margin:+.2f} points (median test); the seeds' "
                     f"largest spread is {100 * spread:.2f}: {'met' if margin > spread else 'not met'}")
    ties = by["ties (fixed)"]["test"]
    for method in ("tsv", "iso_cts"):
        gain = sign * (by[f"{method} (fixed)"]["test"] - ties)
        lines.append(f"{method} (fixed) against fixed TIES: {100 * gain:+.2f} points of test: "
                     f"{'met' if gain > 0 else 'not met'}")
    # the best answer chosen on dev (in the study's direction), its test reported: never chosen by its test score
    best = max((r for r in rows if "task-specific" not in r["name"]), key=lambda r: sign * r["dev"])
    lines.append(f"best answer by dev, {best['name']}, closes {100 * best['gap']:.1f} % of the gap between the average "
                 "of the experts and the task-specific experts (goal 90 %): "
                 f"{'met' if best['gap'] >= 0.9 else 'not met'}")
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = list(results)
    figure, axes = plt.subplots(len(settings), 2, figsize=(13, 4.6 * len(settings)), squeeze=False)
    colours = dict(zip(SEARCHES, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown",
                                    "tab:olive")))
    for (left, right), setting in zip(axes, settings):
        result = results[setting]
        for search, colour in colours.items():
            curves = [r["best_so_far"] for r in result["runs"] if r["search"] == search]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            stacked = 100 * np.array([c[:n] for c in curves])
            x = np.arange(1, n + 1)
            left.plot(x, np.median(stacked, axis=0), color=colour, label=f"{search} (median of {len(curves)} seeds)")
            left.fill_between(x, stacked.min(axis=0), stacked.max(axis=0), color=colour, alpha=0.15)
        refs = result["references"]
        for name, style in (("ties (fixed)", "--"), ("tsv (fixed)", ":"), ("iso_cts (fixed)", "-.")):
            left.axhline(100 * refs[name]["dev"], color="grey", linestyle=style, label=f"{name}, dev")
        estimate = result.get("estimate")
        scored = f", estimated from {100 * estimate['fraction']:.0f} % of dev" if estimate else ""
        left.set(title=f"{setting}: best dev score so far{scored}", xlabel="evaluations (trials)",
                 ylabel="dev score (%)")
        left.legend(fontsize=8)
        rows = result["summary"]
        names = [r["name"] for r in rows]
        for i, row in enumerate(rows):
            colour = colours.get(row["name"], "grey")
            right.barh(i, 100 * row["test"], color=colour, alpha=0.6)
            seeds = [r["test"] for r in result["runs"] if r["search"] == row["name"]]
            right.plot([100 * s for s in seeds], [i] * len(seeds), "k.", markersize=6)
        right.set_yticks(range(len(names)), names, fontsize=8)
        tests = [r["test"] for r in rows] + [r["test"] for r in result["runs"]]  # (the references are rows)
        right.set_xlim(100 * min(tests) - 3, 100 * max(tests) + 3)
        right.axvline(100 * refs["task-specific experts"]["test"], color="black", linestyle=":")
        right.set(title="test score of each answer (bars: median; dots: seeds)", xlabel="test score (%)")
        right.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["minilm-cross-task"])
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=list(SEARCHES))
    parser.add_argument("--evaluations", type=int, default=30, help="trials per search run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--archive", type=int, default=8, help="M2N2's archive size")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    parser.add_argument("--estimate", choices=list(ESTIMATORS), help=(
        "score the searches' trials on --fraction of dev and estimate the whole-dev score (objective.estimate, "
        "fitted on the baselines' dev outcomes; no confirmation: the answer is the best estimate, scored on the "
        "whole dev and test afterwards); default: the whole dev set"))
    parser.add_argument("--fraction", type=float, default=0.2, help="share of dev an estimated trial is scored on")
    parser.add_argument("--precision", choices=["float32", "bfloat16"],
                        help="the searches' precision (default: the baselines study's bfloat16 check)")
    parser.add_argument("--iso-scales", type=float, nargs="*", default=[], help=(
        "also score Iso-CTS on dev at these scales, one evaluation each (how its dev score depends on the scale "
        "its authors tune on validation data), e.g. 1 2 3 4 5 6"))
    parser.add_argument("--workdir", type=Path, default=Path("out/beyond"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    quiet()
    results: dict[str, Any] = {}
    for setting in args.settings:
        folder = args.workdir / setting
        rows, precision, sign = baselines(folder, setting)
        precision = args.precision or precision
        refs = references(rows)
        estimate = {"method": args.estimate, "fraction": args.fraction, "confirm": 0} if args.estimate else None
        jobs = [(str(folder), setting, search, seed, args.evaluations, precision, args.archive, estimate)
                for seed in range(args.seeds) for search in args.searches]
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            scales = [pool.submit(iso_scale, str(folder), setting, scale, precision) for scale in args.iso_scales]
            futures = [pool.submit(one_run, *job) for job in jobs]
            runs = []
            for future in futures:
                runs.append(future.result())
                last = runs[-1]
                print(f"  {last['search']} seed {last['seed']}: {last['trials']} trials ({last['seconds']:.0f} s), "
                      f"answer dev {last['dev']:.4f} test {last['test']:.4f}"
                      + (f", weights {last['weights']}" if last.get("weights") else ""), flush=True)
        swept = [f.result() for f in scales]
        for point in swept:
            print(f"  Iso-CTS at scale {point['scale']:g}: dev {point['dev']:.4f}")
        summary = summarise(runs, refs)
        results[setting] = {"evaluations": args.evaluations, "archive": args.archive, "precision": precision,
                            "estimate": estimate, "iso_scales": swept,
                            "references": refs, "runs": runs, "summary": summary, "goals": goals(summary, sign)}
        scored = f"on {100 * args.fraction:.0f} % of dev, {args.estimate}-estimated" if estimate else "on the whole dev"
        print(f"\n{setting}: {args.evaluations} evaluations per search {scored}, {args.seeds} seeds "
              "(test: median, min-max)")
        print(f"{'':<46}{'evals':>6}{'dev':>8}{'test':>8}{'test min-max':>16}{'gap closed':>12}")
        for row in summary:
            spread = f"{row['test_range'][0]:.4f}-{row['test_range'][1]:.4f}" if row["test_range"] else ""
            print(f"{row['name']:<46}{row['evaluations']:>6.0f}{row['dev']:>8.4f}{row['test']:>8.4f}{spread:>16}"
                  f"{100 * row['gap']:>11.1f}%")
        print("\n".join(["", "goals:", *results[setting]["goals"]]))
    args.out.mkdir(parents=True, exist_ok=True)
    results = write_merged(args.out / "beyond.json", results)
    plot(results, args.out / "beyond.png")
    print(f"\nwrote {args.out / 'beyond.json'} and {args.out / 'beyond.png'}")


if __name__ == "__main__":
    main()
