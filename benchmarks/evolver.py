"""Evolver against the merge baselines, in the layout of Du et al. (2024), Table 2 (issue: Evolver).

On a benchmark setting of `evoopt experts` (default `minilm-sentiment-domains`: four VADER
domain experts; `minilm-cross-task`: four tasks with per-task heads), measured in one run:

  - references: each expert on its own task (domain-specific) and the multi-task model;
  - baselines, scored once: Avg and Best of the experts, the logit ensemble, greedy soup,
    Simple (linear average), Fisher, RegMean, TIES, DARE-TIES;
  - Evolver and X_Evolver (X = Fisher, RegMean, TIES, DARE-TIES with the baselines' own
    coefficients), each a study searched on dev for ``--seeds`` sampler seeds.

Every row: the in-domain macro-average on test (the mean over tasks of each model's own-task
accuracy; test is read only to report), on dev, seconds (baselines: to score the row; Evolver:
the trials' own durations) and dev evaluations. A rerun with the same ``--workdir`` resumes. Evolver rows
are medians over seeds (min-max). The dev and test subsets are the same for every row
(data seed 0); only the Evolver's sampler seed varies.

``--memory`` measures the Evolver's peak memory on SmolLM2-135M instead: three seeded
variants of the packaged model (as in merge_speed.py) as the population, the evaluation
model, a generation of offspring; peak resident memory above the libraries' own, against
(N + 2) x the model's size, in RAM and with the population memory-mapped.

    python benchmarks/evolver.py [--setting minilm-sentiment-domains] [--seeds 3] [--generations 5]
                                 [--limit 100] [--test-limit 500] [--json FILE]
    python benchmarks/evolver.py --memory [--population mmap]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = [("Evolver", "none"), ("Fisher_Evolver", "fisher"), ("RegMean_Evolver", "regmean"),
            ("TIES_Evolver", "ties"), ("DARE-TIES_Evolver", "dare_ties")]
BASELINES = ["sources", "ensemble", "greedy-soup", "linear", "fisher", "regmean", "ties", "dare_ties"]


def base_config(args: argparse.Namespace, work: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "setting": args.setting,
            "objective": {"limit": args.limit, "test_limit": args.test_limit, "batch_size": 64, "max_length": 64},
            "seed": 0, "artifacts": str(work), "baselines": BASELINES, **extra}


def in_domain(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def run_baselines(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from evoopt.study.config import parse_config
    from evoopt.study.run import open_study
    from evoopt.study.run import run_baselines as score_baselines

    config = parse_config(base_config(args, work, "baselines"))
    stored = open_study(config).user_attrs.get("evoopt:baselines")
    if stored:  # a rerun with the same --workdir: scored already
        return list(stored)
    started = time.perf_counter()
    rows = score_baselines(config)
    print(f"baselines: {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def run_references(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The multi-task model, scored like every row (per-task heads: each task's MTL head)."""
    from evoopt.data.experts import get_setting
    from evoopt.models.io import load_target, open_source, resolve_path
    from evoopt.study.config import parse_config
    from evoopt.study.run import Worker

    setting = get_setting(args.setting)
    config = parse_config(base_config(args, work, "references", baselines=[]))
    worker = Worker(config)
    started = time.perf_counter()
    load = lambda ref: load_target(open_source(resolve_path(ref)), dtype=worker.merger.dtype,  # noqa: E731
                                   device=worker.device)
    if setting.shared_head:
        model = load(f"expert:{args.setting}/mtl")
        scores = {split: worker.score(model, split) for split in ("dev", "test")}
    else:  # one MTL model per task (the shared encoder with that task's head), scored on its task
        scores = {"dev": {}, "test": {}}
        for task in setting.tasks:
            model = load(f"expert:{args.setting}/mtl/{task}")
            for split in scores:
                scorer = worker.scorer(split)
                kept = scorer.tasks, scorer.heads
                scorer.tasks, scorer.heads = [task], {}
                try:
                    scores[split][task] = scorer.scores(model)[task]
                finally:
                    scorer.tasks, scorer.heads = kept
    return [{"name": "multi-task model (MTL)", "dev": scores["dev"], "test": scores["test"],
             "seconds": round(time.perf_counter() - started, 1), "evaluations": 0}]


def run_evolver(args: argparse.Namespace, work: Path, label: str, method: str, seed: int) -> dict[str, Any]:
    """One Evolver study, run generation by generation until ``--generations`` are finished (X_Evolver: a
    generation may hold one more trial, its winners scored together), then its answer reported."""
    from evoopt.data.experts import get_setting
    from evoopt.search.evolver import ATTR, EvolverSampler, is_finished, slot_trials
    from evoopt.study.baselines import _BASELINE_RECIPES
    from evoopt.study.config import parse_config
    from evoopt.study.kinds import make_kind
    from evoopt.study.run import open_study, report_best, run_study

    shared, per_model = _BASELINE_RECIPES.get(method, ({}, {}))
    size, integrated = len(get_setting(args.setting).tasks), method != "none"
    config = parse_config(base_config(
        args, work, f"{label}-seed{seed}", baselines=[],
        space={"kind": "evolver", "method": method, "fixed": {**shared, **per_model}},
        sampler={"name": "EvolverSampler", "options": {"strategy": args.strategy, "seed": seed}},
        trials=(1 if integrated else size) + (size + integrated) * args.generations))  # (room for every generation)
    kind = make_kind(config)  # the experts, the evaluation model and the data loaded once for every generation
    study = open_study(config, kind=kind)  # a rerun with the same --workdir resumes
    sampler = study.sampler
    assert isinstance(sampler, EvolverSampler)
    while (history := sampler.history(study)).generation <= args.generations:  # its replay, in its direction
        held = slot_trials(study.get_trials(deepcopy=False), ATTR)
        pending = sum(1 for i in sampler.open_slots(history)
                      if not any(is_finished(t) for t in held.get((history.generation, i), [])))
        run_study(config, n_trials=pending, baselines=False, report=False, kind=kind)
    report_best(config, study, kind=kind)
    result = study.user_attrs["evoopt:result"]
    trials = [t for t in study.get_trials() if t.value is not None]
    # the trials' own durations (sampling, merge, statistics, scoring), so that a resumed run counts right
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                  if t.datetime_complete and t.datetime_start)
    accepted = sum(len(moves) for moves in history.accepted)
    print(f"{label} seed {seed}: dev {in_domain(result['dev']):.4f} test {in_domain(result['test']):.4f} "
          f"({seconds:.0f} s, {len(trials)} evaluations, {accepted} offspring accepted, "
          f"best trial dev {study.best_value:.4f})", flush=True)
    return {"name": label, "seed": seed, "dev": result["dev"], "test": result["test"], "seconds": round(seconds, 1),
            "evaluations": len(trials), "accepted": accepted, "together": len(history.together),
            "best_trial_dev": study.best_value}


def table(rows: list[dict[str, Any]], evolver: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| method | test (in-domain avg) | dev | wall s | dev evaluations |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['test_value']:.4f} | {row['dev_value']:.4f} | "
                     f"{row.get('seconds', 0):.0f} | {row.get('evaluations', '')} |")
    for label, runs in evolver.items():
        tests = [in_domain(r["test"]) for r in runs]
        devs = [in_domain(r["dev"]) for r in runs]
        lines.append(f"| **{label}** | **{statistics.median(tests):.4f}** ({min(tests):.4f}-{max(tests):.4f}) | "
                     f"{statistics.median(devs):.4f} | {statistics.median(r['seconds'] for r in runs):.0f} | "
                     f"{statistics.median(r['evaluations'] for r in runs):g} |")  # (seed 0's before 2026-12-07)
    return "\n".join(lines)


def summary_rows(baselines: list[dict[str, Any]], references: list[dict[str, Any]],
                 setting_tasks: tuple[str, ...]) -> list[dict[str, Any]]:
    """Table 2's rows: references, Avg, Best, Ensemble, Greedy soup, Simple, Fisher, RegMean, TIES, DARE-TIES."""
    sources = [r for r in baselines if r["name"].startswith("source ")]
    # domain-specific experts: each expert on its own task
    own = {split: {task: r[split][task] for task, r in zip(setting_tasks, sources)} for split in ("dev", "test")}
    rows = [{"name": "domain-specific experts (each on its own task)", "dev_value": in_domain(own["dev"]),
             "test_value": in_domain(own["test"]), "seconds": sum(r["seconds"] for r in sources), "evaluations": 0}]
    rows += [{**r, "dev_value": in_domain(r["dev"]), "test_value": in_domain(r["test"])} for r in references]
    names = {"average of sources": "Avg (mean of the experts)", "best source": "Best (expert best on dev)",
             "logit ensemble": "Ensemble (logits)", "greedy soup": "Greedy soup", "linear (fixed)": "Simple average",
             "fisher (fixed)": "Fisher", "regmean (fixed)": "RegMean", "ties (fixed)": "TIES",
             "dare_ties (fixed)": "DARE-TIES"}
    for prefix, label in names.items():
        for r in baselines:
            if r["name"].startswith(prefix):
                evaluations = {"Greedy soup": len(sources) - 1}.get(label, 1 if "fixed" in r["name"] else 0)
                rows.append({"name": label, "dev_value": r["dev_value"], "test_value": r["test_value"],
                             "seconds": r["seconds"], "evaluations": evaluations})
    return rows


def memory(args: argparse.Namespace) -> None:
    """Peak memory of an Evolver generation on SmolLM2-135M variants, in a fresh process per mode."""
    if args.child:
        return memory_child(args)
    from evoopt.models.io import convert_gguf, resolve_path

    sys.path.insert(0, str(Path(__file__).parent))
    from merge_speed import GGUF, make_variants

    make_variants(convert_gguf(resolve_path(GGUF)), Path(args.workdir), count=3)  # cached for the children
    for mode in ("memory", "mmap"):
        command = [sys.executable, __file__, "--memory", "--child", "--population", mode, "--workdir", args.workdir]
        subprocess.run(command, check=True)


def memory_child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401  (the libraries first: the baseline is what they take)
    import transformers  # noqa: F401

    from evoopt.merge.merger import Merger
    from evoopt.merge.recipe import parse_recipe
    from evoopt.models.io import convert_gguf, open_source, resolve_path
    from evoopt.search.evolver import Move, replay
    from evoopt.search.population import Population

    sys.path.insert(0, str(Path(__file__).parent))
    from merge_speed import GGUF, PeakPrivate, make_variants

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = convert_gguf(resolve_path(GGUF))
    variants = make_variants(base, work, count=3)  # made by the parent: nothing is loaded here
    runtime = _rss_peak()
    with PeakPrivate(interval=0.005) as peak_private:
        runtime_anonymous = peak_private.peak
        merger = Merger(parse_recipe({"method": "linear", "models": [{"model": str(v)} for v in variants]}))
        model_bytes = sum(t.numel() * t.element_size() for t in merger.targets.values())
        folder = Path(tempfile.mkdtemp(dir=work)) if args.population == "mmap" else None
        population = Population([open_source(v) for v in variants], list(merger.targets), dtype=merger.dtype,
                                folder=folder)
        history = replay([], size=3, integrated=False, maximize=True, f=0.5, cr=0.5)
        moves = [Move("paper", i, (i, (i + 1) % 3, (i + 2) % 3), 0.5, 0.5, i) for i in range(3)]
        started = time.perf_counter()
        for move in moves:  # a generation of offspring written into the model, then selected
            population.write(merger.targets, move)
        seconds = (time.perf_counter() - started) / len(moves)
        history.accepted = [[], moves]
        population.advance(history, 1)
    peak = _rss_peak()
    private = peak_private.peak - runtime_anonymous
    print(f"population in {args.population}: model {model_bytes / 2**30:.2f} GiB, N = 3; offspring written in "
          f"{seconds:.2f} s each; peak private (anonymous) memory above the libraries {private / 2**30:.2f} GiB = "
          f"{private / model_bytes:.2f} x model (bound N + 2 = 5); peak resident, with the file pages of the "
          f"memory-mapped checkpoints, {(peak - runtime) / 2**30:.2f} GiB = {(peak - runtime) / model_bytes:.2f} x",
          flush=True)


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="minilm-sentiment-domains")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--strategy", default="paper")
    parser.add_argument("--limit", type=int, default=100, help="dev examples per task (search)")
    parser.add_argument("--test-limit", type=int, default=500, help="test examples per task (reporting)")
    parser.add_argument("--variants", default=",".join(label for label, _ in VARIANTS))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="write every row here")
    parser.add_argument("--memory", action="store_true", help="measure peak memory on SmolLM2 instead")
    parser.add_argument("--population", default="memory", choices=["memory", "mmap"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="evoopt-evolver-")
    if args.memory:
        return memory(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from evoopt.data.experts import get_setting

    work = Path(args.workdir)
    tasks = get_setting(args.setting).tasks
    baselines = run_baselines(args, work)
    references = run_references(args, work)
    rows = summary_rows(baselines, references, tasks)
    wanted = args.variants.split(",")
    evolver: dict[str, list[dict[str, Any]]] = {}
    for label, method in VARIANTS:
        if label in wanted:
            evolver[label] = [run_evolver(args, work, label, method, seed) for seed in range(args.seeds)]
    print(f"\n{args.setting}: {len(tasks)} experts, dev {args.limit} / test {args.test_limit} examples per task, "
          f"{args.generations} generations, strategy {args.strategy}, {args.seeds} seeds\n")
    print(table(rows, evolver))
    if args.json:
        from evoopt.models.io import atomic_write
        from evoopt.study.storage import data_rules

        settings = {k: v for k, v in vars(args).items() if k != "workdir"}  # (a machine's own path)
        atomic_write(Path(args.json), json.dumps({"args": settings, "data": data_rules(), "rows": rows,
                                                  "evolver": evolver}, indent=1))


if __name__ == "__main__":
    main()
