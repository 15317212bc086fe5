"""The ``evoopt`` command line: parse, call the library, show progress and a summary."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from evoopt.display import Bars, TrialBar, print_expert_scores, print_summary, stdout_console

if TYPE_CHECKING:
    from evoopt.study.run import RunReport


class _Seconds(click.ParamType):
    """A positive, finite number of seconds (click's FloatRange lets nan and inf through)."""

    name = "seconds"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        import math

        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not (math.isfinite(seconds) and seconds > 0):
            self.fail(f"{value!r} is not a positive, finite number of seconds", param, ctx)
        return seconds


class _Url(click.ParamType):
    """A storage URL that is not blank (``--storage "$DB_URL"`` with the variable unset ran a private local study)."""

    name = "url"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not str(value).strip():
            self.fail("an empty storage URL (an unset variable?); give the URL, or leave the option out for the "
                      "config's storage", param, ctx)
        return str(value)


_COUNT = click.IntRange(min=1)  # counts of trials, workers, examples, steps: zero or less is a mistake
_SECONDS = _Seconds()
_URL = _Url()


class _Boundary(click.Group):
    """The command line's one error boundary: an EvooptError (bad input, a missing file, an
    unreachable storage) is printed as one message; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> object:
        from evoopt.errors import EvooptError

        try:
            return super().invoke(ctx)
        except EvooptError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=_Boundary, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
@click.version_option(package_name="evoopt", message="%(prog)s %(version)s")
def main(verbose: bool) -> None:
    """evoopt: evolutionary model merging as Optuna studies.

    Search how to merge fine-tuned experts of one pretrained model: a study
    config names the experts, the search space and the dev-set objective;
    `evoopt run STUDY.yaml` creates or resumes it (`evoopt demo` runs the
    default one), `evoopt best` and `evoopt export` hand back the winner.
    `evoopt merge` merges with a fixed recipe; `evoopt methods` lists the
    merge methods.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(verbose)


def _quiet_libraries(verbose: bool = False) -> None:
    """The CLI draws its own progress bars and tables; silence the libraries' per-file and per-trial logs."""
    import warnings

    import optuna

    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the merged model to (Hugging Face layout). Written atomically.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only after the merge completed).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Override the recipe's device (auto: CUDA when present).")
def merge(recipe: Path, out: Path, overwrite: bool, device: str | None) -> None:
    """Merge the models of RECIPE (a YAML file) and export the result to --out.

    \b
    Example recipe (TIES over two experts of one base):
      method: ties
      base: path/to/base
      models:
        - {model: path/to/expert_a, parameters: {weight: 0.5, density: 0.7}}
        - {model: path/to/expert_b, parameters: {weight: 0.5, density: 0.7}}
    Coefficients may be per tensor group: density: {"layers.0*": 0.3, "*": 0.7}.
    Paths may be pkg:PACKAGE/sub/path to use a model shipped in a Python package.
    """
    from rich.console import Console
    from rich.table import Table

    import evoopt.data.experts  # noqa: F401  (registers the expert: references a recipe may use)
    from evoopt.merge.merger import Merger
    from evoopt.merge.recipe import load_recipe
    from evoopt.models.io import check_writable

    console = Console(stderr=True)
    started = time.perf_counter()
    parsed = load_recipe(recipe)
    if device is not None:
        parsed.device = device  # type: ignore[assignment]
    check_writable(out, overwrite=overwrite)
    with Bars(console) as bars:
        merger = Merger(parsed, progress=bars)
        merger.merge()
        bars("exporting", 0, 1)
        merger.export(out, overwrite=overwrite)
    table = Table(title="evoopt merge", show_header=False)
    table.add_row("method", f"{parsed.method}  ({parsed.merge_method.paper})")
    table.add_row("sources", str(len(parsed.models)) + (" + base" if parsed.base else ""))
    params = sum(t.numel() for t in merger.targets.values())
    table.add_row("tensors merged", f"{len(merger.targets)} ({params / 1e6:.1f} M parameters)")
    table.add_row("dtype / device", f"{str(merger.dtype).removeprefix('torch.')} / {merger.device}")
    table.add_row("time", f"{time.perf_counter() - started:.1f} s")
    table.add_row("output", str(out))
    stdout_console().print(table)


@main.command()
@click.argument("setting")
@click.option("--limit-train", type=_COUNT, default=None, help="Use at most N training examples per task (quick runs).")
@click.option("--steps", type=_COUNT, default=None, help="Override the number of training steps per expert.")
@click.option("--no-multitask", is_flag=True, help="Skip the multi-task reference model.")
def experts(setting: str, limit_train: int | None, steps: int | None, no_multitask: bool) -> None:
    """Fine-tune (or reuse) the experts of a benchmark SETTING and show their scores.

    \b
    Settings: minilm-sentiment-domains (one expert per VADER domain, shared head),
              minilm-cross-task (SMS spam, TREC, BBC, Rotten Tomatoes; per-task heads),
              smollm2-tasks (SmolLM2-135M-Instruct, SMS spam and TREC as answer text,
              scored through lm-eval; on 2 CPU cores 43 min for its two experts beside
              other work and 6 min for its multi-task model, measured).
    Models are cached under $EVOOPT_CACHE/experts ($EVOOPT_CACHE: ~/.cache/evoopt) in
    content-addressed folders, so a second run reuses them (scoring them again, not
    training, when evoopt's dev or test rows changed; trained anew in new folders when
    their training rows or the base's files changed). Accuracy on dev (used for
    search) and test (reporting only) is printed for every model.
    """
    from dataclasses import replace

    from rich.console import Console

    from evoopt.data.experts import build_setting, cross_scores, get_setting

    chosen = get_setting(setting)
    train = replace(chosen.train, steps=steps) if steps else None
    with Bars(Console(stderr=True)) as bars:
        built = build_setting(setting, progress=bars, limit_train=limit_train, multitask=not no_multitask, train=train)
    print_expert_scores(built, cross_scores if chosen.shared_head else None)


DEMO_STUDY = Path("studies/minilm-sentiment-domains.yaml")
DEMO_OUT = Path("out/demo-best")


@main.command()
@click.option("--study", type=click.Path(dir_okay=False, path_type=Path),
              default=DEMO_STUDY, show_default=True, help="The study config to run.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEMO_OUT,
              show_default=True, help="Where to export the best merged model (the default is replaced by each run; "
              "another folder that exists only with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.pass_context
def demo(ctx: click.Context, study: Path, out: Path, overwrite: bool) -> None:
    """The main job: build the MiniLM sentiment-domain experts, search their TIES merge, export the best.

    Fine-tunes one expert per VADER domain (cached after the first run; with --study,
    the experts of its setting, none for a study of your own sources), runs the
    default study on the embedded SQLite storage (out/studies/NAME/evoopt.db; a
    second run resumes it), prints baselines vs the best merge found on dev and
    test, and exports the best merged model to --out.
    """
    from rich.console import Console

    from evoopt.data.experts import build_setting
    from evoopt.models.io import check_writable
    from evoopt.study.config import StudyConfig
    from evoopt.study.run import check_sources, export_described
    from evoopt.study.storage import check_stored

    if not study.exists() and study == DEMO_STUDY:
        raise click.UsageError(f"{study}: not found here; run the demo from the repository's root folder, or give "
                               "--study CONFIG")
    overwrite = overwrite or out == DEMO_OUT  # (a folder of the user's is never replaced unasked)
    check_writable(out, overwrite=overwrite)  # before the experts and the search
    config = _load_study_config(study)
    assert isinstance(config, StudyConfig)
    check_stored(config)  # (a stored study this config would be refused by: refused before the experts are trained)
    check_sources(config)
    started = time.perf_counter()
    if config.setting is not None:  # (a study of the user's own sources has no experts to build)
        with Bars(Console(stderr=True)) as bars:
            build_setting(config.setting, progress=bars, multitask=False)
            bars.echo(f"experts: ready in {time.perf_counter() - started:.1f} s")
    if ctx.invoke(run, study=study).interrupted:
        return  # Ctrl-C: the finished trials are stored; the demo's next run resumes and exports
    _, what = export_described(config, "best", out, overwrite=overwrite)
    stdout_console().print(f"best merged model ({what}) written to {out}; dashboard: evoopt dashboard {study}")


@main.command()
def methods() -> None:
    """List the merge methods, their coefficients and papers."""
    from rich.table import Table

    from evoopt.merge import available_methods, get_method

    table = Table(title="merge methods")
    for column in ("name", "per-model coefficients", "shared coefficients", "base", "paper"):
        table.add_column(column, overflow="fold")  # (on a narrow terminal: a name or value wrapped, never cut)
    for name in available_methods():
        method = get_method(name)
        per_model = ", ".join(f"{k}={v}" for k, v in method.per_model.items())
        shared = ", ".join(f"{k}={v}" for k, v in method.shared.items())
        table.add_row(name, per_model, shared, "yes" if method.needs_base else "no", method.paper)
    stdout_console().print(table)


# --- studies ----------------------------------------------------------------------------------------

_STORAGE = click.option("--storage", type=_URL, default=None, help="An Optuna storage URL instead of the config's "
                        "`storage` (postgresql://USER@HOST/DB, mysql://..., sqlite:///FILE, journal:PATH): the one "
                        "the study was run on with `run --storage` or `worker --storage`.")


def _load_study_config(path: Path, root: Path | None = None, storage: str | None = None) -> object:
    """The study config of ``path``; ``storage`` replaces its storage URL (a run-time key: same study)."""
    from evoopt.study.config import load_config

    config = load_config(path, root=root)  # (a local worker's config.json: checked against the study's folder)
    if storage is not None:
        config = config.model_copy(update={"storage": storage})  # (keeps the root)
    return config


@main.command()
@click.argument("study", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--n-trials", type=_COUNT, default=None, help="Run at most N trials now (default: up to the study's "
              "`trials` budget, counting the finished trials already stored).")
@click.option("--timeout", type=_SECONDS, default=None, help="Stop starting new trials after this many seconds, "
              "counted after the baselines (first run), in every worker alike (default: the config's `timeout`).")
@click.option("--workers", type=_COUNT, default=1, show_default=True,
              help="Local worker processes sharing the study's storage and the machine's cores (each gets "
              "cores / N threads unless OMP_NUM_THREADS is set).")
@_STORAGE
@click.option("--no-baselines", is_flag=True, help="Do not evaluate the baselines first.")
@click.option("--quiet", is_flag=True, help="No progress bar and no table; the best trial is still scored on test "
              "(see `evoopt status`).")
@click.option("--worker-index", type=click.IntRange(min=0), default=None, hidden=True)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None, hidden=True)
def run(study: Path, n_trials: int | None, timeout: float | None, workers: int, storage: str | None,
        no_baselines: bool, quiet: bool, worker_index: int | None, root: Path | None) -> RunReport:
    """Create or resume the study of STUDY (a YAML config) and run it.

    \b
    A study that exists in the storage continues where it stopped: finished trials
    are kept, trials of a dead process are retried, and the budget (`trials` in the
    config) counts what is already there. First run: the baselines (sources,
    ensemble, greedy soup, fixed merges) are scored on dev and test, so the table
    at the end shows the search beside what it must beat. Stop with Ctrl-C at any
    time; run the same command again to continue.
    \b
    Spaces (space.kind): global, one coefficient per model; layerwise, one per
    model and layer group (Akiba et al. 2024); evolver, the experts' weights
    themselves, with sampler EvolverSampler (Du et al. 2024: one offspring a
    trial, synchronous generations replayed from the storage; space.method none
    for the plain Evolver, or ties, dare_ties, fisher, regmean... for X_Evolver);
    dfs, the data-flow space (Akiba et al. 2024): which layers of which models of
    space.pool a token passes through, with scales; a pool entry study:OTHER.yaml
    is the best model of another study (PS+DFS); methods / methods-layerwise,
    the merge method searched too (space.methods: each method's coefficients;
    each method first scored at its known-good start); m2n2, with sampler
    M2N2Sampler (Abrantes et al. 2025): an archive seeded with the experts, one
    child a trial by crossover at an evolved split, parents by resource
    competition and attraction (options archive, brood, alpha, attract,
    interpolation; space.seeds, e.g. [ties], adds merges of the experts to the
    first archive); the answer is the archive's best member by dev.
    Samplers (sampler.name): any optuna.samplers class, or EvoCmaSampler,
    evoopt's CMA-ES, whose state is the stored trials (resumable, safe with
    --workers, IPOP/BIPOP, sep-CMA, margin; one CMA-ES per method in a method
    search, the methods raced by successive rejects).
    Fitness: every trial keeps its per-example dev results. objective.estimate
    {method: anchor|strata|mixture|irt|random, fraction: 0.1, references: 0,
    confirm: 5} (the defaults; references: 20 is a good start) scores trials on
    a few examples fitted from the baselines (and the first `references`
    trials, scored on all of dev) and estimates the full
    dev score; the answer is the best of the `confirm` best estimates re-scored
    on all of dev (answer_level: 0.05, a later run, or with promote_within a
    later promoted trial, changes it only for a trial better by a paired test on
    all of dev; promote_within: 0, a trial whose estimate beats the best
    all-of-dev score so far is scored on all of dev at once, inside --timeout,
    and confirm: 0 then scores nothing after the run). pruner RacingPruner with
    objective.fidelities stops a trial once a paired test on the same examples
    finds it worse than the best; objective.precision auto (default) scores
    trials in bfloat16 where the sources keep their results.
    \b
    Example:  evoopt run studies/minilm-sentiment-domains.yaml --n-trials 10
              evoopt run studies/minilm-sentiment-layerwise.yaml --workers 2
              evoopt run studies/minilm-sentiment-evolver.yaml --workers 4
              evoopt run studies/smollm2-dfs.yaml
    """
    from rich.console import Console

    from evoopt.study.config import StudyConfig
    from evoopt.study.run import WORKER_STORAGE_ENV, from_parent, run_study

    # a local worker of run --workers N is given the storage URL in its environment, not in the config file it
    # reads (which would keep a database password on disk)
    config = _load_study_config(study, root, storage or from_parent(WORKER_STORAGE_ENV))
    assert isinstance(config, StudyConfig)
    console = Console(stderr=True)
    if quiet:  # a worker process of `--workers N` is given its --worker-index: its parent reports
        return run_study(config, n_trials=n_trials, timeout=timeout, workers=workers, worker_index=worker_index or 0,
                         baselines=not no_baselines, report=worker_index is None)
    with TrialBar(console, config) as bar:
        report = run_study(config, n_trials=n_trials, timeout=timeout, workers=workers, progress=bar.stage,
                           on_trial=bar.trial, baselines=not no_baselines)
    print_summary(config, report.study, report.rows)
    if report.interrupted:
        Console(stderr=True).print("[yellow]interrupted[/yellow]: finished trials are stored; run the same "
                                   "command again to continue.")
    return report


@main.command()
@click.argument("study", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--storage", type=_URL, default=None, help="The shared Optuna storage URL (postgresql://USER@HOST/DB, "
              "mysql://..., or journal:PATH on a shared file system); default: the config's `storage`.")
@click.option("--n-trials", type=_COUNT, default=None, help="Run at most N trials in this worker.")
@click.option("--timeout", type=_SECONDS, default=None, help="Stop starting new trials after this many seconds "
              "(default: the config's `timeout`).")
@click.option("--index", type=click.IntRange(min=0), default=None,
              help="This worker's number, which seeds samplers that draw per process (e.g. TPE); default: from the "
              "host's name and the pid (containers often share a pid). 0 also does `evoopt run`'s first duties "
              "(a method search's starts, the estimator's fit).")
def worker(study: Path, storage: str | None, n_trials: int | None, timeout: float | None, index: int | None) -> None:
    """Run trials of STUDY as one of many workers on a shared storage.

    \b
    Start any number of these, on any number of machines, against one database:
    each takes trials until the study has its `trials` budget of finished
    trials (never more), sharing the sampler's state through the storage. One
    GPU per worker: set CUDA_VISIBLE_DEVICES for each (CPU without one). A
    worker killed mid-trial loses nothing: its trial is failed after the
    config's grace_period and taken again. Baselines and the test report are
    left to `evoopt run` / `evoopt baselines`.
    \b
    Example:  evoopt worker studies/minilm-sentiment-evolver.yaml \\
                  --storage postgresql://evoopt@db-host/evoopt
    """
    from evoopt.study.config import StudyConfig
    from evoopt.study.run import default_worker_index, run_study

    config = _load_study_config(study, storage=storage)
    assert isinstance(config, StudyConfig)
    run = run_study(config, n_trials=n_trials, timeout=timeout, baselines=False, report=False,
                    worker_index=default_worker_index() if index is None else index)
    click.echo(f"worker done: {run.ran} trials finished while it ran; the study has {len(run.study.trials)} trials")


@main.command()
@click.argument("study", type=click.Path(dir_okay=False, path_type=Path))
@_STORAGE
def baselines(study: Path, storage: str | None) -> None:
    """Score and record the baselines of STUDY: each source, their average and best, the logit
    ensemble, greedy soup, and fixed merges (linear, task arithmetic, TIES, DARE-TIES, Fisher,
    RegMean), on dev and test.

    Each model is scored once: the ensemble is taken from the sources' outputs, and greedy soup,
    its candidates and linear (the soup of every source) share their scores by recipe."""
    from rich.console import Console

    from evoopt.study.config import StudyConfig
    from evoopt.study.report import summary_rows
    from evoopt.study.run import check_sources, run_baselines, taken_back_if_refused

    config = _load_study_config(study, storage=storage)
    assert isinstance(config, StudyConfig)
    # opened once: the rows are stored on it and the table read from it; a new study refused is taken back
    check_sources(config)  # (before the storage is made)
    with taken_back_if_refused(config) as (opened, _), Bars(Console(stderr=True)) as bars:
        run_baselines(config, progress=bars, study=opened)
    print_summary(config, opened, summary_rows(opened))


@main.command()
@click.argument("study", type=click.Path(dir_okay=False, path_type=Path))
@_STORAGE
def status(study: Path, storage: str | None) -> None:
    """Show the trials of STUDY by state, the baselines and the best so far."""
    from evoopt.study.report import summary_rows

    config, opened = _existing_study(study, storage)
    print_summary(config, opened, summary_rows(opened))  # type: ignore[arg-type]


def _existing_study(path: Path, storage: str | None = None) -> tuple[object, object]:
    """The config of PATH and its study, which must exist in the storage: read only (no sampler, no model)."""
    from evoopt.study.config import StudyConfig
    from evoopt.study.storage import load_study

    config = _load_study_config(path, storage=storage)
    assert isinstance(config, StudyConfig)
    return config, load_study(config)


@main.command()
@click.argument("study", type=click.Path(dir_okay=False, path_type=Path))
@_STORAGE
def best(study: Path, storage: str | None) -> None:
    """Print the best trial of STUDY: its value, per-task scores and its merge recipe (YAML).

    An Evolver study: each individual's fitness, the fittest, and the answer's scores.
    A data-flow study: the best trial's path (hops and scales) instead of a recipe.
    """
    import optuna

    from evoopt.study.config import StudyConfig
    from evoopt.study.kinds import make_kind

    config, opened = _existing_study(study, storage)
    assert isinstance(config, StudyConfig) and isinstance(opened, optuna.Study)
    click.echo(make_kind(config).best_text(opened), nl=False)


@main.command()
@click.argument("study", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trial", "which", default="best", show_default=True,
              help="'best' (an Evolver study: its answer, the fittest individual or X of the population) "
                   "or a trial number.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the Hugging Face model (per-task heads: one sub-folder per task).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is written).")
@_STORAGE
def export(study: Path, which: str, out: Path, overwrite: bool, storage: str | None) -> None:
    """Rebuild a trial's merged model from STUDY and save it with its recipe and model card.

    A data-flow study's model is saved with its layers in path order and a small modeling
    file that applies the scales: load it with AutoModelForCausalLM.from_pretrained(DIR,
    trust_remote_code=True).
    """
    from evoopt.study.config import StudyConfig
    from evoopt.study.run import export_described

    config = _load_study_config(study, storage=storage)
    assert isinstance(config, StudyConfig)
    if which != "best" and not (which.isascii() and which.isdigit()):  # ('²' is a digit to isdigit)
        raise click.BadParameter("give 'best' or a trial number", param_hint="--trial")
    _, what = export_described(config, which, out, overwrite=overwrite)
    click.echo(f"exported study {config.name} to {out}: {what}")


def _needs(command: str, *modules: str) -> None:
    """Refuse ``command`` at once where a package of the ``eval`` extra it imports is not installed (it failed
    with a traceback after loading the studies, or after saying it serves)."""
    import importlib.util

    if missing := [m for m in modules if importlib.util.find_spec(m) is None]:
        raise click.ClickException(f"evoopt {command} needs {', '.join(m.replace('_', '-') for m in missing)}, "
                                   "not installed here: pip install 'evoopt[eval]'")


@main.command()
@click.argument("studies", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/compare"),
              show_default=True, help="Folder for compare.png and compare.html.")
@_STORAGE
def compare(studies: tuple[Path, ...], out: Path, storage: str | None) -> None:
    """Put several STUDIES side by side (e.g. one merge searched by TPE, CMA-ES and random).

    Prints a table (best value, test score of the best trial, trials until the best
    so far came within 1 % of the final best, wall time) and writes best-so-far plots
    against trials and against wall time to --out (PNG and self-contained HTML); both
    are also attached to each study as artifacts, which optuna-dashboard shows (a
    later compare replaces them). The studies must score one metric.
    """
    from rich.table import Table

    from evoopt.study.config import StudyConfig
    from evoopt.study.report import compare_studies

    _needs("compare", "matplotlib", "plotly")
    configs = [_load_study_config(p, storage=storage) for p in studies]  # (--storage: one for every study)
    rows, files = compare_studies([c for c in configs if isinstance(c, StudyConfig)], out)
    table = Table(title="evoopt compare")
    for column in ("study", "sampler", "space", "finished", "best (dev)", "test", "trials to within 1 %",
                   "wall time"):
        table.add_column(column, justify="left" if column in ("study", "sampler", "space") else "right",
                         overflow="fold")
    for row in rows:
        test = "-" if row["test"] is None else f"{row['test']:.4f}"
        table.add_row(row["name"], row["sampler"], row["space"], str(row["finished"]), f"{row['best']:.4f}", test,
                      str(row["trials_to_99"]), f"{row['wall_seconds']:.0f} s")
    shown = stdout_console()
    shown.print(table)
    shown.print("plots: " + ", ".join(str(f) for f in files))


@main.command()
@click.argument("study", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default is reachable from this machine only.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="The port to serve on.")
@_STORAGE
def dashboard(study: Path, host: str, port: int, storage: str | None) -> None:
    """Serve optuna-dashboard on STUDY's storage and artifact store (Ctrl-C stops it).

    Every trial shows its merge recipe, per-task scores and timings (user attributes);
    the study's note lists sources, baselines and the best so far; the best recipe and
    the `evoopt compare` plots are attached as artifacts.
    """
    from evoopt.study.config import StudyConfig
    from evoopt.study.report import dashboard_command, serve_dashboard
    from evoopt.study.storage import load_study, read_storage

    _needs("dashboard", "optuna_dashboard")
    config = _load_study_config(study, storage=storage)
    assert isinstance(config, StudyConfig)
    opened = read_storage(config)  # once: checked, then served
    load_study(config, opened)  # the study exists and was made from this config, before it says it serves
    shown = config.storage_shown  # (the password masked in what is printed)
    import socket

    try:  # a port taken or a host that does not resolve: said before "serving", not a traceback after it
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise click.ClickException(f"--host {host} --port {port}: cannot serve there ({error.strerror or error}); "
                                   "choose another --port (or --host)") from None
    click.echo(f"serving {shown} on http://{host}:{port}  (same as: "
               f"{' '.join(dashboard_command(config, host, port)).replace(config.storage_url, shown)})")
    serve_dashboard(config, host=host, port=port, storage=opened)


@main.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def lm_eval_command(ctx: click.Context) -> None:
    """lm-evaluation-harness with evoopt's model: `evoopt lm-eval --model evoopt --model_args ...`.

    \b
    Every lm_eval argument works; the evoopt model builds the merged model in memory:
      --model_args recipe=RECIPE.yaml
      --model_args config=STUDY.yaml,trial=best     (or study=NAME,storage=URL,trial=N)
    evoopt's own option: --split test (or dev) scores, of the --tasks the study of config= searched on
    (objective.tasks), only that half of their documents, as the study split them (lm-eval's --samples).
    Example:
      evoopt lm-eval --model evoopt --model_args recipe=r.yaml --tasks TASK --include_path DIR
    (lm-eval has no plugin discovery, so plain `lm_eval` does not know `--model evoopt`;
    from Python, `import evoopt.integrations.lm_eval` registers it for lm_eval.simple_evaluate.)
    """
    from evoopt.integrations.lm_eval import main as lm_eval_main

    if ctx.args in ([], ["-h"], ["--help"]):  # evoopt's usage first, then lm-eval's own
        click.echo(ctx.get_help() + "\n\nlm-eval's own help follows (`evoopt lm-eval run --help`: every option of "
                   "a run).\n")
    lm_eval_main(list(ctx.args) or ["--help"])


if __name__ == "__main__":
    main()
