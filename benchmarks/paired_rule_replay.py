"""The Evolver's paired decisions of finished studies, decided again by today's paired test (no model is scored).

Each offspring of an Evolver study with ``selection: paired`` kept the outcomes it was decided on (the examples
scored up to the stage that decided it) and the trial it was compared with (``target_trial``, whose outcomes are
kept too). This replays every decision with :func:`evoopt.data.outcomes.paired_decision` as it is now, at the same
stage, and counts how the decisions change: written for the change from the z-test on the sample variance to
McNemar's test on right-or-wrong outcomes (2026-12-07), on the 60-minute runs made before it.

    python benchmarks/paired_rule_replay.py out/fs_told/minilm-sentiment-domains/evolver-raced-seed*/evoopt.db
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import optuna

from evoopt.data.outcomes import paired_decision, trial_outcomes
from evoopt.study.storage import study_weights


def replay(path: Path) -> Counter[str]:
    url = f"sqlite:///{path}"
    (name,) = optuna.get_all_study_names(url)
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    weights = study_weights(study) or None
    counts: Counter[str] = Counter()
    for trial in trials:
        record, target = trial.user_attrs.get("selection"), trial.user_attrs.get("target_trial")
        if not record or target is None or record.get("decided") is None:
            continue
        candidate, rival = trial_outcomes(trial), trial_outcomes(trials[int(target)])
        if candidate is None or rival is None:
            counts["not replayable (outcomes not kept)"] += 1
            continue
        final = record["decided"] == "accepted" or trial.state == optuna.trial.TrialState.COMPLETE
        decided, _ = paired_decision(candidate, rival, maximize=maximize, alpha=record["alpha"], final=final,
                                     weights=weights)
        before = f"{record['decided']} at {'the whole dev set' if final else 'an early stage'}"
        counts[f"{before} -> {decided or 'scored further'}"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", type=Path, nargs="+", help="SQLite files of Evolver studies with selection: paired")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    total: Counter[str] = Counter()
    for path in args.studies:
        counts = replay(path)
        total.update(counts)
        print(f"{path}: " + "; ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print("all: " + "; ".join(f"{k}: {v}" for k, v in sorted(total.items())))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
