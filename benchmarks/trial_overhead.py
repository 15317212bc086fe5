"""Per-trial cost of a study against plain evaluation (issue: study engine overhead).

The MiniLM ``minilm-sentiment-domains`` setting (four sentiment experts and their
base), a TIES global space (per-expert weight and density), the dev objective on
300 examples per task without fidelities, no baselines, a temporary SQLite storage
with heartbeats on (as by default). Measured in one run, on this machine:

  (a) study trials run through the engine exactly as ``run_study`` runs them: one
      :class:`~evoopt.study.run.Worker`, ``study.optimize(worker.objective, ...)`` with
      the same callbacks, ``catch`` and ``gc_after_trial``. A trial's wall time
      runs from the end of the previous trial's callbacks (or the start of the
      ``optimize`` call) to the end of its own: stale-trial check, sampling, the
      merge into the preloaded model, scoring, storage writes, heartbeat thread,
      callbacks. The trials' own ``datetime_start`` .. ``datetime_complete`` is
      reported beside it, with the ``merge_seconds`` and ``eval_seconds`` they store;
  (b) the same worker's dev scorer on one fixed model (the centre of the space,
      merged once and copied) in a plain loop: no merge, no Optuna.

The two interleave: a last callback evaluates the fixed model between consecutive
trials (outside any trial's time), so that the load of the machine drifts alike for
both. One warm-up trial and one warm-up evaluation are not counted. Prints medians
and their ratio (machines are noisy: compare the ratio, not seconds); the target is
a ratio <= 1.10, i.e. merge and bookkeeping cost less than 10 % of evaluation.
The same callback merges each trial's recipe again alone (same weights), to split the
trial's ``merge_seconds`` into the merge itself and the rest: sampling the parameters
(each one a storage write) and storing the recipe.

With ``--precision bfloat16`` the trials are scored under bfloat16 autocast (``objective.precision``)
while the plain loop stays the float32 reference: the ratio then shows what the precision saves.

    python benchmarks/trial_overhead.py [--trials 20] [--repeats 2] [--device auto]
                                        [--sampler TPESampler] [--limit 300] [--precision float32] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
import transformers

from evoopt.study.config import StudyConfig, parse_config
from evoopt.study.run import FINISHED, EvaluationError, Worker, open_study

SETTING = "minilm-sentiment-domains"
SAMPLERS: dict[str, dict[str, Any]] = {
    "TPESampler": {"name": "TPESampler", "options": {"n_startup_trials": 8, "multivariate": True}},  # as the demo
    "RandomSampler": {"name": "RandomSampler"},
}


def make_config(folder: Path, *, device: str, sampler: str, trials: int, limit: int = 300,
                precision: str = "float32", batch_size: int | str = 64) -> StudyConfig:
    """The benchmark study: the demo's space and objective without fidelities, pruner or baselines."""
    data = {
        "name": "bench-trial-overhead", "setting": SETTING,
        "space": {"kind": "global", "method": "ties", "search": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}},
        "sampler": SAMPLERS[sampler],
        "objective": {"kind": "dev", "metric": "accuracy", "limit": limit, "precision": precision,
                      "batch_size": batch_size},
        "trials": trials, "seed": 0, "device": device, "baselines": [],
        "storage": f"sqlite:///{(folder / 'evoopt.db').as_posix()}", "artifacts": str(folder),
    }
    return parse_config(data, source="benchmark study")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def blocks(total: int, count: int) -> list[int]:
    """``total`` split into ``count`` sizes that differ by at most one."""
    count = max(1, min(count, total))
    return [total // count + (i < total % count) for i in range(count)]


class Bench:
    """One worker and its study; a plain evaluation of the fixed model runs between consecutive trials."""

    def __init__(self, config: StudyConfig, evaluations: int) -> None:
        self.config = config
        self.worker = Worker(config)
        self.device = self.worker.device
        self.study = open_study(config)
        self.scorer = self.worker.scorer(config.objective.split)  # dev data tokenised once, as in a study
        # one fixed model: the centre of the space, merged once and copied out of the worker's model
        self.reference = copy.deepcopy(self.worker.merged(self.worker.space.default()))
        self.evaluations_per_gap = evaluations
        self.walls: list[float] = []
        self.plains: list[float] = []
        self.recipes: list[float] = []
        self.merges: list[float] = []
        self.numbers: list[int] = []
        self._start = 0.0
        # the callbacks run_study passes, then ours last: it sees the end of everything a trial costs
        self.callbacks = [optuna.study.MaxTrialsCallback(config.trials, states=FINISHED), self._between]

    def _between(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """End of a trial (its callbacks included): stamp it; merge its recipe again alone (the same
        weights: the worker's model is left as the trial made it) and evaluate the fixed model; start the next.
        """
        sync(self.device)
        self.walls.append(time.perf_counter() - self._start)
        self.numbers.append(trial.number)
        t0 = time.perf_counter()
        recipe = self.worker.space.recipe(trial.params)
        t1 = time.perf_counter()
        self.worker.merger.merge(recipe)
        sync(self.device)
        self.recipes.append(t1 - t0)
        self.merges.append(time.perf_counter() - t1)
        self.plains += self.evaluations(self.evaluations_per_gap)
        self._start = time.perf_counter()

    def evaluations(self, count: int) -> list[float]:
        times = []
        self.scorer.autocast = False  # the reference: the plain float32 loop, whatever the trials' precision
        for _ in range(count):
            t0 = time.perf_counter()
            self.scorer.scores(self.reference)
            sync(self.device)
            times.append(time.perf_counter() - t0)
        return times

    def trials(self, count: int) -> None:
        """One optimize call of ``count`` trials, as run_study makes it."""
        sync(self.device)
        self._start = time.perf_counter()
        self.study.optimize(self.worker.objective, n_trials=count, callbacks=self.callbacks,
                            catch=(EvaluationError,), gc_after_trial=False)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure(config: StudyConfig, trials: int, repeats: int, evaluations: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    bench = Bench(config, evaluations)
    setup = time.perf_counter() - t0
    bench.evaluations(1)  # warm-up: first forward passes
    bench.trials(1)  # warm-up: first merge (kernel compilation), first storage writes
    bench.walls, bench.plains, bench.numbers, bench.recipes, bench.merges = [], [], [], [], []
    rounds = []
    for size in blocks(trials, repeats):
        done, evaluated = len(bench.walls), len(bench.plains)
        bench.trials(size)
        rounds.append(median(bench.walls[done:]) / median(bench.plains[evaluated:]))
    walls, plains = bench.walls, bench.plains

    frozen = {t.number: t for t in bench.study.get_trials(deepcopy=False)}
    complete = [frozen[n] for n in bench.numbers if frozen[n].state == optuna.trial.TrialState.COMPLETE]
    spans = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete
             if t.datetime_start and t.datetime_complete]
    merges = [float(t.user_attrs["merge_seconds"]) for t in complete]
    evals = [float(t.user_attrs["eval_seconds"]) for t in complete]
    by_number = dict(zip(bench.numbers, walls))
    rest = [by_number[t.number] - float(t.user_attrs["merge_seconds"]) - float(t.user_attrs["eval_seconds"])
            for t in complete]
    pure = dict(zip(bench.numbers, bench.merges))
    suggest = [float(t.user_attrs["merge_seconds"]) - pure[t.number] for t in complete]
    wall, plain = median(walls), median(plains)
    engine = [by_number[t.number] - float(t.user_attrs["eval_seconds"]) for t in complete]  # all but scoring
    per = evaluations
    paired = [w / median(plains[i * per : (i + 1) * per]) for i, w in enumerate(walls)]
    return {
        "setting": SETTING, "device": device_name(bench.device), "sampler": config.sampler.name,
        "torch": torch.__version__, "optuna": optuna.__version__, "trials": len(walls),
        "failed_trials": len(walls) - len(complete), "evaluations": len(plains), "rounds": len(rounds),
        "examples_per_task": config.objective.limit, "tasks": len(bench.scorer.tasks),
        "batch_size": bench.worker.evaluator.batch_size(),
        "worker_setup_s": setup,
        "median_trial_wall_s": wall, "median_trial_span_s": median(spans), "median_plain_eval_s": plain,
        "ratio": wall / plain, "ratio_span": median(spans) / plain, "ratio_paired": median(paired),
        "round_ratios": rounds,
        "median_merge_s": median(merges), "median_eval_s": median(evals), "eval_vs_plain": median(evals) / plain,
        "median_rest_s": median(rest), "median_pure_merge_s": median(bench.merges),
        "median_recipe_s": median(bench.recipes),
        "median_suggest_s": median(suggest),
        "median_engine_s": median(engine), "engine_share": median(engine) / plain,
        "min_trial_wall_s": min(walls), "min_plain_eval_s": min(plains), "ratio_of_minima": min(walls) / min(plains),
        "trial_walls_s": walls, "plain_evals_s": plains,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="measured trials (default 20)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="optimize calls the trials are split into, each with its own ratio (default 2)")
    parser.add_argument("--evaluations", type=int, default=1,
                        help="plain evaluations of the fixed model after each trial (default 1)")
    parser.add_argument("--limit", type=int, default=300, help="dev examples per task (default 300, as the issue)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="TPESampler")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="the trials' scoring precision (objective.precision); the plain loop stays float32")
    parser.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default=64,
                        help="objective.batch_size: examples per forward pass, or auto (sized to a GPU; 64 on a CPU)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if min(args.trials, args.repeats, args.evaluations, args.limit) < 1:
        parser.error("--trials, --repeats, --evaluations and --limit must be at least 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="evoopt-bench-trials-") as folder:
        # budget: the measured trials and the warm-up, so MaxTrialsCallback never stops a round early
        config = make_config(Path(folder), device=args.device, sampler=args.sampler, trials=args.trials + 1,
                             limit=args.limit, precision=args.precision, batch_size=args.batch_size)
        r = measure(config, args.trials, args.repeats, args.evaluations)
    r["load_average_before"] = list(load_before)
    r["load_average_after"] = list(os.getloadavg())

    r["precision"] = args.precision
    print(f"{SETTING}: TIES global space, {r['sampler']}, trials in {args.precision} (the plain loop in float32), "
          f"{r['tasks']} tasks x {r['examples_per_task']} dev examples in batches of {r['batch_size']}, "
          f"SQLite storage with heartbeats; {r['device']}, torch {r['torch']}, optuna {r['optuna']}")
    print("load average (1, 5, 15 min): before " + ", ".join(f"{x:.2f}" for x in r["load_average_before"])
          + "; after " + ", ".join(f"{x:.2f}" for x in r["load_average_after"]))
    print(f"worker setup (once): {r['worker_setup_s']:.1f} s; {r['trials']} trials in {r['rounds']} optimize "
          f"calls, {r['evaluations']} plain evaluations between them ({r['failed_trials']} trials failed)")
    print(f"  trial wall time, median:  {r['median_trial_wall_s']:.3f} s "
          f"(the trials' datetime_start..complete: {r['median_trial_span_s']:.3f} s)")
    print(f"  plain evaluation, median: {r['median_plain_eval_s']:.3f} s (fixed model, same scorer and dev data)")
    print(f"  ratio trial / evaluation: {r['ratio']:.3f} (target <= 1.10); from the datetimes "
          f"{r['ratio_span']:.3f}; median of each trial over the evaluation after it {r['ratio_paired']:.3f}; "
          "per optimize call " + ", ".join(f"{x:.3f}" for x in r["round_ratios"])
          + f"; of the minima ({r['min_trial_wall_s']:.3f} s / {r['min_plain_eval_s']:.3f} s) "
          f"{r['ratio_of_minima']:.3f}")
    print(f"  inside a trial, medians: merge_seconds {r['median_merge_s']:.3f} s, of which the merge alone "
          f"(redone between trials) {r['median_pure_merge_s']:.3f} s and the rest (sampling and storing the "
          f"parameters and recipe; per-trial difference) {r['median_suggest_s']:.3f} s; "
          f"eval_seconds {r['median_eval_s']:.3f} s ({r['eval_vs_plain']:.3f} x the "
          f"plain evaluation); the rest (ask, tell, user attrs, heartbeat, stale-trial check, callbacks) "
          f"{r['median_rest_s']:.3f} s")
    print(f"  everything but scoring (trial wall time - eval_seconds), median: {r['median_engine_s']:.3f} s = "
          f"{100 * r['engine_share']:.1f} % of the plain evaluation (less noisy than the ratio: no second "
          "evaluation in it)")
    if args.json:
        from evoopt.models.io import atomic_write

        atomic_write(args.json, json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
