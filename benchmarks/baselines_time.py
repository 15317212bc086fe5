"""Time of a study's baselines (``evoopt baselines``) against the code of a reference commit, in the same run.

The demo's study (``studies/minilm-sentiment-domains.yaml``: four MiniLM sentiment experts, 300 dev and up to
500 test examples per domain, the default baselines) is scored by ``evoopt baselines`` on a fresh SQLite storage,
alternately by this checkout and by ``--reference`` (a git ref, checked out into a temporary worktree and put
first on ``PYTHONPATH``), ``--repeats`` times each (reference first, then this checkout, in turn, so the load of
the machine drifts alike for both). Before timing, each version scores the sources once on a few examples (numba
compiles its merge kernel on first use and caches it beside each version's source). Prints each row's seconds
(median over repeats) for both, the total and its ratio (machines are noisy: read the ratio), and checks that
both versions wrote the same rows (names, dev and test scores, to the digit).

The default reference is the commit before the baselines learned to score each model once (the logit ensemble
from the sources' outputs; greedy soup and linear sharing scores by recipe).

    python benchmarks/baselines_time.py [--study studies/minilm-sentiment-domains.yaml] [--reference 0b09173]
                                        [--repeats 2] [--json benchmarks/results/baselines_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "0b09173"  # before "Baselines score each model once"


def baselines(code: Path, config: dict[str, Any], folder: Path) -> tuple[float, list[dict[str, Any]]]:
    """Run ``evoopt baselines`` from ``code`` on a fresh storage in ``folder``: its wall seconds and rows."""
    folder.mkdir(parents=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({**config, "artifacts": str(folder / "artifacts")}))
    storage = f"sqlite:///{folder / 'study.db'}"
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evoopt.cli", "baselines", str(path), "--storage", storage],
                   check=True, env=env, cwd=code, stdout=subprocess.DEVNULL)  # (-m: cwd first on sys.path)
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=config["name"], storage=storage)
    return seconds, study.user_attrs["evoopt:baselines"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=ROOT / "studies/minilm-sentiment-domains.yaml")
    parser.add_argument("--reference", default=REFERENCE, help="the git ref whose code is the reference")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = yaml.safe_load(args.study.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reference = work / "reference"
        subprocess.run(["git", "worktree", "add", "--detach", str(reference), args.reference], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        try:
            versions = {"reference": reference, "this checkout": ROOT}
            warm = {**config, "baselines": ["sources"],
                    "objective": {**config.get("objective", {}), "limit": 4, "test_limit": 4, "fidelities": []}}
            for label, code in versions.items():  # numba's kernel compiled and cached for each version's source
                baselines(code, warm, work / f"warm-{label.replace(' ', '-')}")
            runs: dict[str, list[tuple[float, list[dict[str, Any]]]]] = {label: [] for label in versions}
            for repeat in range(args.repeats):
                for label, code in versions.items():
                    runs[label].append(baselines(code, config, work / f"{label.replace(' ', '-')}-{repeat}"))
                    print(f"repeat {repeat + 1}, {label}: {runs[label][-1][0]:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT, check=False)
    first = {label: [(r["name"], round(r["dev_value"], 6), round(r["test_value"], 6)) for r in found[0][1]]
             for label, found in runs.items()}
    same = all([(r["name"], round(r["dev_value"], 6), round(r["test_value"], 6)) for r in rows] == first["reference"]
               for found in runs.values() for _, rows in found)
    names = [name for name, _, _ in first["reference"]]
    seconds = {label: {name: statistics.median(next(r["seconds"] for r in rows if r["name"] == name)
                                               for _, rows in found) for name in names}
               for label, found in runs.items()}
    totals = {label: statistics.median(s for s, _ in found) for label, found in runs.items()}
    width = max(len(name) for name in names) + 2
    print(f"\n{'row':<{width}}{'reference s':>13}{'this s':>10}{'dev':>9}{'test':>9}")
    for name, dev, test in first["reference"]:
        print(f"{name:<{width}}{seconds['reference'][name]:>13.1f}{seconds['this checkout'][name]:>10.1f}"
              f"{dev:>9.4f}{test:>9.4f}")
    ratio = totals["this checkout"] / totals["reference"]
    print(f"\n`evoopt baselines` wall time, median of {args.repeats}: reference {args.reference} "
          f"{totals['reference']:.1f} s, this checkout {totals['this checkout']:.1f} s: ratio {ratio:.2f}")
    print("rows the same in every run (names, dev and test to 6 digits):", "yes" if same else "NO")
    if args.json:
        record = {"study": str(args.study.relative_to(ROOT)) if args.study.is_relative_to(ROOT) else str(args.study),
                  "reference": args.reference, "repeats": args.repeats, "totals": totals, "ratio": round(ratio, 3),
                  "rows_same": same, "seconds": seconds, "rows": first["this checkout"],
                  "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_suffix(".tmp")
        partial.write_text(json.dumps(record, indent=1))
        partial.replace(args.json)
    if not same:
        raise SystemExit("the two versions wrote different rows")


if __name__ == "__main__":
    main()
