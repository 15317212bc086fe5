"""Comparing studies, and serving them in optuna-dashboard.

:func:`compare_studies` puts several studies side by side (say TPE against random
search on one merge): a table of their best values, time and trials to converge,
and their best-so-far curves against trials and against wall-clock seconds, as
``compare.png`` (matplotlib) and ``compare.html`` (plotly, self-contained: works
offline). Both files are also uploaded as artifacts to every compared study, so
optuna-dashboard shows them. :func:`serve_dashboard` runs optuna-dashboard on a
study's storage and artifact store.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from evoopt.data.objective import combine
from evoopt.errors import ConfigError
from evoopt.models.io import atomic_write, check_writable
from evoopt.study.config import StudyConfig
from evoopt.study.kinds import Kind, make_kind
from evoopt.study.storage import (
    FINISHED,
    artifact_store,
    attach,
    best_trial,
    load_study,
    storage_from_url,
    study_weights,
    trial_value,
)

CONVERGED = 0.99  # a study has converged once its best so far is within 1% of its final best


@dataclass
class Curve:
    """Best value so far of one study: after each completed trial (by number), and over wall-clock seconds."""

    name: str
    trials: list[int]  # trial number + 1: trials run so far, pruned and failed ones included
    by_trial: list[float]
    seconds: list[float]  # since the study's first trial started
    by_time: list[float]


def _cumulative(values: list[float], maximize: bool) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else (max if maximize else min)(out[-1], v))
    return out


def best_so_far(study: optuna.Study) -> Curve:
    """The cumulative best (max or min, by the study's direction) of its completed trials."""
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials(deepcopy=False)
    start = min(t.datetime_start for t in trials if t.datetime_start is not None)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]  # in number order
    ends = {t.number: t.datetime_complete or start for t in complete}
    timed = sorted(complete, key=lambda t: ends[t.number])  # in the order they finished
    weights = study_weights(study)
    return Curve(name=study.study_name, trials=[t.number + 1 for t in complete],
                 by_trial=_cumulative([trial_value(t, weights) for t in complete], maximize),
                 seconds=[(ends[t.number] - start).total_seconds() for t in timed],
                 by_time=_cumulative([trial_value(t, weights) for t in timed], maximize))


def _row(config: StudyConfig, study: optuna.Study, curve: Curve) -> dict[str, Any]:
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    peak = curve.by_trial[-1]  # the best value the trials reached (an estimated study's: an estimate)
    margin = (1 - CONVERGED) * abs(peak)
    reached = next(n for n, v in zip(curve.trials, curve.by_trial)
                   if (v >= peak - margin if maximize else v <= peak + margin))
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    summary = summary_rows(study)[-1]  # the answer's row comes last: its dev and test describe one model
    return {"name": study.study_name, "sampler": config.sampler.name,
            "space": make_kind(config).title(),
            "direction": "maximize" if maximize else "minimize",
            "finished": len(study.get_trials(deepcopy=False, states=FINISHED)), "best": summary["dev"],
            "wall_seconds": (max(ends) - min(starts)).total_seconds(), "trials_to_99": reached,
            "test": summary["test"]}


def _load(config: StudyConfig) -> optuna.Study:
    study = load_study(config)  # read only: no sampler, no space, no model
    if best_trial(study) is None:
        raise ConfigError(f"study {config.name!r} in {config.storage_shown} has no completed trial; run it first")
    return study


def _png(curves: list[Curve], label: str, file: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg backend, without touching pyplot's global one
    by_trial, by_time = figure.subplots(1, 2)
    for c in curves:
        by_trial.step(c.trials, c.by_trial, where="post", marker=".", label=c.name)
        by_time.step(c.seconds, c.by_time, where="post", marker=".", label=c.name)
    by_trial.set(title="Best so far by trial", xlabel="trial", ylabel=label)
    by_trial.xaxis.set_major_locator(MaxNLocator(integer=True))  # (trials are whole)
    by_time.set(title="Best so far by wall-clock time", xlabel="seconds since the first trial started",
                ylabel=label)
    for axes in (by_trial, by_time):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(file, format="png", dpi=100)


def _html(curves: list[Curve], rows: list[dict[str, Any]], label: str, file: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=2, subplot_titles=("Best so far by trial", "Best so far by wall-clock time"))
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, c in enumerate(curves):
        style = {"name": c.name, "legendgroup": c.name, "mode": "lines+markers", "line_shape": "hv",
                 "line_color": colors[i % len(colors)]}
        figure.add_trace(go.Scatter(x=c.trials, y=c.by_trial, **style), row=1, col=1)
        figure.add_trace(go.Scatter(x=c.seconds, y=c.by_time, showlegend=False, **style), row=1, col=2)
    figure.update_xaxes(title_text="trial", row=1, col=1)
    figure.update_xaxes(title_text="seconds since the first trial started", row=1, col=2)
    figure.update_yaxes(title_text=label)
    keys = list(rows[0])
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(_text(r[k]))}</td>" for k in keys) + "</tr>" for r in rows)
    table = f"<table><tr>{''.join(f'<th>{html.escape(k)}</th>' for k in keys)}</tr>{cells}</table>"
    plot = figure.to_html(include_plotlyjs=True, full_html=False)  # plotly.js inline: no internet needed
    file.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>evoopt: study comparison</title>"
                    "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style>"
                    f"</head><body><h1>Study comparison</h1>{table}{plot}</body></html>\n", encoding="utf-8")


def _text(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def compare_studies(configs: list[StudyConfig], out: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Compare studies: a row each, ``out/compare.png`` and ``out/compare.html``, uploaded to every study.

    A row has the study's name, sampler, search space, finished trials, best value, wall time (first
    trial start to last trial end, seconds), the trial by which its best so far came within 1% of
    its final best, and the test score of its best trial where `report_best` stored one.
    """
    if not configs:
        raise ConfigError("compare: give at least one study")
    if len({c.objective.metric for c in configs}) > 1:  # (one axis: a best accuracy beside a best perplexity)
        raise ConfigError("compare: the studies score different metrics ("
                          + ", ".join(f"{c.name}: {c.objective.metric}" for c in configs)
                          + "); compare studies of one metric")
    metric = configs[0].objective.metric
    label = f"best {metric} ({'lower' if configs[0].directions[0] == 'minimize' else 'higher'} is better)"
    studies = [_load(c) for c in configs]
    curves = [best_so_far(s) for s in studies]
    rows = [_row(c, s, curve) for c, s, curve in zip(configs, studies, curves)]
    out = Path(out)
    check_writable(out, overwrite=True, inside=True)  # (its files are replaced one by one)
    out.mkdir(parents=True, exist_ok=True)
    files = [atomic_write(out / "compare.png", lambda f: _png(curves, label, f)),
             atomic_write(out / "compare.html", lambda f: _html(curves, rows, label, f))]
    for config, study in zip(configs, studies):
        for file in files:
            attach(config, study, file)
    return rows, files


# --- the study's table and note ----------------------------------------------------------------------

def summary_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Baselines and the best trial found: name, dev and test values."""
    rows = [{"name": r["name"], "dev": r["dev_value"], "test": r["test_value"]}
            for r in study.user_attrs.get("evoopt:baselines", [])]
    trial = best_trial(study)
    weights = study_weights(study)
    if trial is not None:
        report = study.user_attrs.get("evoopt:test", {}).get(str(trial.number))
        dev = trial_value(trial, weights)  # (several objectives: weighted as the baselines' rows)
        test, name = None, f"best found (trial {trial.number})"
        if report:
            test = combine(report["test"], weights)
            if "estimated" in trial.user_attrs and report["dev"]:  # chosen by its estimate, shown by its whole dev
                name = f"best found (trial {trial.number}, estimated dev {dev:.4f})"
                dev = combine(report["dev"], weights)
        rows.append({"name": name, "dev": dev, "test": test})
    if result := study.user_attrs.get("evoopt:result"):
        what = "fittest individual" if result.get("method") == "none" else f"{result.get('method')} of the population"
        rows.append({"name": result.get("name") or f"Evolver result ({what}, generation {result['generation']})",
                     "dev": combine(result["dev"], weights), "test": combine(result["test"], weights)})
    return rows


def update_note(config: StudyConfig, study: optuna.Study, kind: Kind | None = None) -> None:
    """The study's Markdown note in optuna-dashboard: sources, baselines, best so far."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    kind = kind or make_kind(config)
    sources = kind.sources
    lines = [f"# {config.name}", "", f"Search space: {kind.title()}; sampler "
             f"{config.sampler.name}; objective {config.objective.kind} {config.objective.metric} on "
             f"{config.objective.split} (test is for reporting only).", "", "## Sources", ""]
    lines += [f"- base: `{sources.base}`"] if sources.base else []
    lines += [f"- `{m}`" for m in sources.models]
    lines += ["", "## Baselines vs best found", "", "| | dev | test |", "|---|---|---|"]
    for row in summary_rows(study):
        test = "" if row["test"] is None else f"{row['test']:.4f}"
        lines.append(f"| {row['name']} | {row['dev']:.4f} | {test} |")
    save_note(study, "\n".join(lines) + "\n")


# --- optuna-dashboard --------------------------------------------------------------------------------

def dashboard_command(config: StudyConfig, host: str = "127.0.0.1", port: int = 8080) -> list[str]:
    """The `optuna-dashboard` command line that serves this study like :func:`serve_dashboard`."""
    storage = config.storage_url.removeprefix("journal:")  # the CLI takes a journal file by its path
    return ["optuna-dashboard", storage, "--artifact-dir", str(config.artifact_dir / "artifacts"),
            "--host", host, "--port", str(port)]


def serve_dashboard(config: StudyConfig, host: str = "127.0.0.1", port: int = 8080,
                    storage: optuna.storages.BaseStorage | None = None) -> None:
    """Run optuna-dashboard on the study's storage (``storage``: opened before) and artifact store until
    interrupted."""
    from optuna_dashboard import run_server

    run_server(storage or storage_from_url(config.storage_url, create=False), host=host, port=port,
               artifact_store=artifact_store(config))
