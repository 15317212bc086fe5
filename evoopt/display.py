"""What the command line shows: progress (bars on a terminal, lines in a log), tables and summaries."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

LOG_WIDTH = 200  # the width of tables written to a pipe or a log file (rich's 80 cut names and values short)


def stdout_console() -> Any:
    """A rich console for standard output: a terminal's width on a terminal; elsewhere (a pipe, a log file)
    :data:`LOG_WIDTH` columns unless $COLUMNS says otherwise."""
    from rich.console import Console

    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=LOG_WIDTH if wide else None)


class Bars:
    """Progress fed by the library's ``progress(stage, done, total)`` callbacks.

    On a terminal: rich progress bars. Otherwise (a log file, a pipe, a batch job): one line
    per finished stage with its time, and one for each phase ("baselines") with its total; a
    stage still running after a minute says how far it is, once a minute.
    """

    EVERY = 60.0

    def __init__(self, console: object) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        assert isinstance(console, Console)
        self.console = console
        self.log = not console.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), console=console, transient=True)
        self.tasks: dict[str, object] = {}
        self.current: str | None = None  # log mode: the stage under way, since when, and each phase's start
        self.since = self.shown = 0.0
        self.phases: dict[str, float] = {}

    def __enter__(self) -> Bars:
        if not self.log:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.log:
            self._end(time.perf_counter())
        else:
            self.bar.__exit__(*exc)  # type: ignore[arg-type]

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.log:
            return self._line(stage, done, total)
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done)  # type: ignore[arg-type]

    def echo(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def _line(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        phase = stage.partition(":")[0]
        if stage != self.current:
            self._end(now)
            if stage == phase and phase in self.phases and done >= total:  # "baselines" closing its stages
                self.echo(f"{phase}: done in {now - self.phases.pop(phase):.1f} s")
                return
            self.phases.setdefault(phase, now)
            self.current, self.since, self.shown = stage, now, now
        if total and done >= total:
            self._end(now)
        elif now - self.shown > self.EVERY:  # a long stage says how far it is
            self.echo(f"{stage}: {done}/{total} after {now - self.since:.0f} s")
            self.shown = now

    def _end(self, now: float) -> None:
        if self.current is not None:
            self.echo(f"{self.current}: {now - self.since:.1f} s")
            self.current = None


class TrialBar(Bars):
    """Stages of the set-up, then the trials: one bar with ETA and the best value so far, or (not a
    terminal) one line per trial and the phase's time at the end."""

    def __init__(self, console: object, config: object) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        super().__init__(console)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            TextColumn("{task.fields[best]}"), console=self.console, transient=True)
        self.config = config
        self.trials: object = None
        self.trials_started = 0.0
        self.ran = 0

    def __enter__(self) -> TrialBar:
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.log and self.trials is not None:
            self.echo(f"trials: {self.ran} ran in {time.perf_counter() - self.trials_started:.1f} s")
        super().__exit__(*exc)

    def stage(self, stage: str, done: int, total: int) -> None:
        if self.log:
            if self.trials is None:  # set-up phases; once trials run, their merges are part of each trial's line
                self._line(stage, done, total)
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, best="")
        self.bar.update(self.tasks[stage], completed=done)  # type: ignore[arg-type]

    def trial(self, study: object, trial: object) -> None:
        import optuna

        from evoopt.study.storage import FINISHED, best_by_value, study_weights, trial_value

        assert isinstance(study, optuna.Study) and isinstance(trial, optuna.trial.FrozenTrial)
        best = best_by_value(study)
        text = ""
        if best is not None and len(best.values) == 1:
            text = f"best {best.values[0]:.4f} (#{best.number})"
        elif best is not None:  # several objectives: the (weighted) mean of the best on the front, as best_by_value
            text = f"best mean {trial_value(best, study_weights(study)):.4f} (#{best.number})"
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        total = self.config.trials  # type: ignore[attr-defined]
        if self.trials is None:
            self._end(time.perf_counter())  # the set-up's last stage ends with the first trial
            self.trials_started = time.perf_counter()
            self.trials = self.bar.add_task("trials", total=total, best="")
        if self.log:
            self.ran += 1
            value = "" if trial.values is None else " value " + ", ".join(f"{v:.4f}" for v in trial.values)
            seconds = "" if trial.duration is None else f" in {trial.duration.total_seconds():.1f} s"
            self.echo(f"trial {trial.number}: {trial.state.name.lower()}{value}{seconds}; {done}/{total} "
                      f"finished; {text}")
            return
        self.bar.update(self.trials, completed=done, best=text)  # type: ignore[arg-type]


def print_expert_scores(built: object, cross: object) -> None:
    from rich.table import Table

    from evoopt.data.experts import ExpertSet

    assert isinstance(built, ExpertSet)
    out = stdout_console()
    tasks = built.setting.tasks
    for split in ("dev", "test"):
        table = Table(title=f"{built.setting.name}: accuracy on {split}" +
                      (" (search and selection)" if split == "dev" else " (reporting only)"))
        table.add_column("model")
        for t in tasks:
            table.add_column(t, justify="right")
        if cross is not None:
            scores = cross(built, split)  # type: ignore[operator]
            for model, row in scores.items():
                cells = [f"[bold]{row[t]:.3f}[/bold]" if model == t else f"{row[t]:.3f}" for t in tasks]
                table.add_row(model, *cells)
        else:
            for model, meta in built.scores().items():
                if "scores" in meta:
                    table.add_row(model, *[f"{meta['scores'][t][split]:.3f}" if t in meta["scores"] else "-"
                                           for t in tasks])
        out.print(table)
    seconds = [m.get("train_seconds", 0.0) for m in built.scores().values()]
    out.print(f"training time of the models in this table: {sum(seconds):.0f} s")


def print_summary(config: object, study: object, rows: list[dict[str, object]]) -> None:
    from rich.table import Table

    from evoopt.study.run import FINISHED

    table = Table(title=f"{study.study_name}: mean score, dev (search) and test (reporting)")  # type: ignore[attr-defined]
    table.add_column("model")
    table.add_column("dev", justify="right")
    table.add_column("test", justify="right")
    for row in rows:
        test = row["test"]
        style = "bold" if str(row["name"]).startswith("best found") else None
        table.add_row(str(row["name"]), f"{row['dev']:.4f}", "-" if test is None else f"{test:.4f}", style=style)
    out = stdout_console()
    out.print(table)
    trials = study.get_trials(deepcopy=False)  # type: ignore[attr-defined]
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in {t.state for t in trials}}
    done = sum(t.state in FINISHED for t in trials)
    counts = f" ({', '.join(f'{n} {k}' for k, n in states.items())})" if states else ""
    out.print(f"{done}/{config.trials} trials finished{counts}; "  # type: ignore[attr-defined]
                  f"storage {config.storage_shown}", soft_wrap=True)  # type: ignore[attr-defined]
