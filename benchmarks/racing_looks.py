"""How often racing stops a candidate as good as the incumbent, testing at every stage at level alpha.

Equal candidates: two independent models of the same accuracy, their outcomes on the same examples drawn from a
seeded generator; the paired test the RacingPruner uses (:func:`evoopt.data.outcomes.paired_test`) at each stage.
Prints the share stopped at some stage against the share a single test at the last stage stops (both should be
near alpha for a rule that holds its level; testing at every stage adds up).

    .venv/bin/python benchmarks/racing_looks.py [--races 2000] [--alpha 0.05] [--stages 30 60 120 240 480]
"""

from __future__ import annotations

import argparse

import numpy as np

from evoopt.data.outcomes import Outcomes, TaskOutcomes, paired_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--races", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--accuracy", type=float, default=0.8)
    parser.add_argument("--stages", type=int, nargs="+", default=[30, 60, 120, 240, 480])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    last = args.stages[-1]
    any_stage = at_last = 0
    for _ in range(args.races):
        a, b = rng.random(last) < args.accuracy, rng.random(last) < args.accuracy
        stopped = [paired_test(Outcomes("accuracy", {"t": TaskOutcomes(np.arange(k), a[:k])}),
                               Outcomes("accuracy", {"t": TaskOutcomes(np.arange(k), b[:k])}),
                               maximize=True)[0] < args.alpha for k in args.stages]
        any_stage += any(stopped)
        at_last += stopped[-1]
    print(f"equal candidates (accuracy {args.accuracy}), {args.races} races, stages {args.stages}, alpha "
          f"{args.alpha}: stopped at some stage {any_stage / args.races:.3f}, by the last stage's test alone "
          f"{at_last / args.races:.3f} (ratio {any_stage / max(1, at_last):.1f})")


if __name__ == "__main__":
    main()
