"""PS, DFS and PS+DFS on the SmolLM2-135M task experts (issue: data-flow-space merging).

Akiba et al. (2024)'s comparison on `smollm2-tasks` (SMS spam and TREC question type experts
of SmolLM2-135M-Instruct), measured in one run, every model scored on the same held-out test
subsets (test is read only to report; every search reads dev):

  - the sources (each expert), and the fixed merges the parameter-space study scores first;
  - PS: the best trial of ``studies/smollm2-tasks.yaml`` (DARE-TIES coefficients, TPE);
  - DFS: the best trial of ``studies/smollm2-dfs.yaml`` (the path through both experts'
    layers, sep-CMA-ES from A's own path);
  - PS+DFS: the best trial of ``studies/smollm2-ps-dfs.yaml`` (the PS model as A, the TREC
    expert as B).

Each row: test accuracy per task and their mean, dev mean, path length (layers a token passes
through), parameter count of the model as exported, dev evaluations used (PS+DFS counts the
PS study's too) and the seconds those evaluations took. The studies are copies of the ones in
``studies/`` with the budgets and subset sizes given here, in ``--workdir``; a rerun with the
same workdir resumes them.

    python benchmarks/dfs.py [--ps-trials 20] [--dfs-trials 24] [--limit 50] [--test-limit 200]
                             [--workdir out/bench-dfs] [--json benchmarks/results/dfs.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

STUDIES = Path(__file__).resolve().parent.parent / "studies"


def study_file(work: Path, name: str, trials: int, args: argparse.Namespace) -> Path:
    """A copy of ``studies/<name>.yaml`` in the workdir with this run's budget and subsets."""
    data = yaml.safe_load((STUDIES / f"{name}.yaml").read_text())
    data.update(trials=trials, artifacts=str(work / "studies"))
    data["objective"].update(limit=args.limit, test_limit=args.test_limit)
    file = work / f"{name}.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def run(file: Path) -> Any:
    from evoopt.study.config import load_config
    from evoopt.study.run import open_study, run_study

    config = load_config(file)
    started = time.perf_counter()
    report = run_study(config)
    print(f"{config.name}: {report.ran} trials run in {time.perf_counter() - started:.0f} s", flush=True)
    return config, open_study(config, create=False)


def evaluations(study: Any) -> tuple[int, float]:
    """Finished trials and the seconds they took (their own durations)."""
    from evoopt.study.run import FINISHED

    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return len(trials), sum(t.duration.total_seconds() for t in trials if t.duration is not None)


def best_row(name: str, config: Any, study: Any, spent: tuple[int, float]) -> dict[str, Any]:
    from evoopt.data.objective import combine
    from evoopt.study.run import Worker, best_trial
    from evoopt.study.space import DfsSpace

    trial = best_trial(study)
    assert trial is not None
    report = study.user_attrs["evoopt:test"][str(trial.number)]
    row = {"name": f"{name} (trial {trial.number})", "test": report["test"], "test_mean": combine(report["test"]),
           "dev_mean": trial.value, "evaluations": spent[0], "seconds": round(spent[1], 1)}
    worker = Worker(config.model_copy(update={"device": "cpu"}), study=study)
    if isinstance(worker.space, DfsSpace):
        from evoopt.models.paths import path_parameters

        path = worker.space.path(trial.params)
        row.update(path=worker.space.describe(path), length=len(path.hops),
                   parameters=path_parameters(worker.pool, path))
    else:
        row.update(length=worker.model.config.num_hidden_layers,
                   parameters=sum(p.numel() for p in worker.model.parameters()))
    return row


def table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    head = "| model | " + " | ".join(f"test {t}" for t in tasks) + " | test mean | dev mean | layers | parameters " \
           "| evaluations | seconds |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 7)]
    for r in rows:
        cells = [f"{r['test'].get(t, float('nan')):.4f}" for t in tasks]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['test_mean']:.4f} | {r['dev_mean']:.4f} | "
                     f"{r.get('length', '')} | {r.get('parameters', 0) / 1e6:.1f} M | {r['evaluations']} | "
                     f"{r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ps-trials", type=int, default=20)
    parser.add_argument("--dfs-trials", type=int, default=24)
    parser.add_argument("--limit", type=int, default=50, help="dev examples per task (search)")
    parser.add_argument("--test-limit", type=int, default=200, help="test examples per task (reporting only)")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench-dfs"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ps_config, ps = run(study_file(work, "smollm2-tasks", args.ps_trials, args))
    dfs_config, dfs = run(study_file(work, "smollm2-dfs", args.dfs_trials, args))
    psdfs_config, psdfs = run(study_file(work, "smollm2-ps-dfs", args.dfs_trials, args))

    from evoopt.data.objective import combine

    rows: list[dict[str, Any]] = []
    for b in ps.user_attrs["evoopt:baselines"]:
        if b["name"].startswith(("average", "best source")):
            continue
        rows.append({"name": b["name"], "test": b["test"], "test_mean": combine(b["test"]), "dev_mean": b["dev_value"],
                     "evaluations": 0, "seconds": b["seconds"]})
    spent_ps = evaluations(ps)
    rows.append(best_row("PS: DARE-TIES coefficients", ps_config, ps, spent_ps))
    for r in rows[:-1]:  # the sources and fixed merges have the same architecture as the PS model
        r.update(length=rows[-1]["length"], parameters=rows[-1]["parameters"])
    rows.append(best_row("DFS: path through both experts", dfs_config, dfs, evaluations(dfs)))
    spent = evaluations(psdfs)
    rows.append(best_row("PS+DFS: path through PS model and TREC expert", psdfs_config, psdfs,
                         (spent[0] + spent_ps[0], spent[1] + spent_ps[1])))
    tasks = sorted(rows[0]["test"])
    print(table(rows, tasks))
    for r in rows:
        if "path" in r:
            print(f"{r['name']}: {r['path']}")
    if args.json is not None:
        from evoopt.models.io import atomic_write
        from evoopt.study.storage import data_rules

        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("workdir", "json")}
        atomic_write(args.json, json.dumps({"settings": settings, "data": data_rules(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
