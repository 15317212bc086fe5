"""DELLA written straight into the model against the same kernel's result copied into it, in one process.

The Merger passes the model's own tensor to a method that ``writes_into`` it (DELLA); turned off, the kernel
returns a new tensor that the Merger copies. Both are timed on the same Merger, alternating, so that the
machine's drift falls on both alike. Needs the bfloat16 SmolLM2 variants of ``merge_speed.py --dtype bfloat16``
in its workdir.

    python benchmarks/della_into.py [--workdir DIR] [--rounds 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import recipe_for  # noqa: E402

from evoopt.merge.merger import Merger  # noqa: E402
from evoopt.merge.recipe import parse_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "evoopt-bench-merge")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    bases = [p for p in args.workdir.glob("SmolLM2*-bfloat16") if p.is_dir()]
    variants = [args.workdir / "variant_0-bfloat16", args.workdir / "variant_1-bfloat16"]
    if not bases or not all(v.is_dir() for v in variants):
        sys.exit(f"{args.workdir}: run benchmarks/merge_speed.py --dtype bfloat16 first (it writes the variants)")
    merger = Merger(parse_recipe(recipe_for("della", bases[0], variants, 0.5, [0.5, 0.5], "bfloat16")))
    methods = {"into": merger.method, "copied": dataclasses.replace(merger.method, writes_into=False)}
    times: dict[str, list[float]] = {label: [] for label in methods}
    merger.merge()  # (compiles the kernel)
    for round_ in range(args.rounds):
        for label in (("into", "copied") if round_ % 2 == 0 else ("copied", "into")):
            merger.method = methods[label]
            started = time.perf_counter()
            merger.merge()
            times[label].append(time.perf_counter() - started)
    for label, seconds in times.items():
        print(f"{label:>6}: median {statistics.median(seconds):.3f} s per candidate "
              f"({' '.join(f'{t:.3f}' for t in seconds)})")
    print(f"copied / into: {statistics.median(times['copied']) / statistics.median(times['into']):.2f}")


if __name__ == "__main__":
    main()
