"""The ``evoopt`` command line: parse, call the library, show progress and a summary."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
def main(verbose: bool) -> None:
    """evoopt: evolutionary model merging as Optuna studies.

    Merge fine-tuned experts of one pretrained model with a fixed recipe
    (`evoopt merge`) and list the merge methods (`evoopt methods`).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()


def _quiet_libraries() -> None:
    """The CLI draws its own progress bars; silence the libraries' per-file ones."""
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


class _Bars:
    """A rich progress display fed by the library's ``progress(stage, done, total)`` callbacks."""

    def __init__(self, console: object) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), console=console, transient=True)  # type: ignore[arg-type]
        self.tasks: dict[str, object] = {}

    def __enter__(self) -> _Bars:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)  # type: ignore[arg-type]

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done)  # type: ignore[arg-type]


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

    from evoopt.io import ModelSourceError, check_writable
    from evoopt.merger import Merger
    from evoopt.recipe import RecipeError, load_recipe

    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        parsed = load_recipe(recipe)
        if device is not None:
            parsed.device = device  # type: ignore[assignment]
        check_writable(out, overwrite=overwrite)
        with _Bars(console) as bars:
            merger = Merger(parsed, progress=bars)
            merger.merge()
            bars("exporting", 0, 1)
            merger.export(out, overwrite=overwrite)
    except (RecipeError, ModelSourceError, FileExistsError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    table = Table(title="evoopt merge", show_header=False)
    table.add_row("method", f"{parsed.method}  ({parsed.merge_method.paper})")
    table.add_row("sources", str(len(parsed.models)) + (" + base" if parsed.base else ""))
    params = sum(t.numel() for t in merger.targets.values())
    table.add_row("tensors merged", f"{len(merger.targets)} ({params / 1e6:.1f} M parameters)")
    table.add_row("dtype / device", f"{str(merger.dtype).removeprefix('torch.')} / {merger.device}")
    table.add_row("time", f"{time.perf_counter() - started:.1f} s")
    table.add_row("output", str(out))
    Console().print(table)


@main.command()
@click.argument("setting")
@click.option("--limit-train", type=int, default=None, help="Use at most N training examples per task (quick runs).")
@click.option("--steps", type=int, default=None, help="Override the number of training steps per expert.")
@click.option("--no-multitask", is_flag=True, help="Skip the multi-task reference model.")
def experts(setting: str, limit_train: int | None, steps: int | None, no_multitask: bool) -> None:
    """Fine-tune (or reuse) the experts of a benchmark SETTING and show their scores.

    \b
    Settings: minilm-sentiment-domains (one expert per VADER domain, shared head),
              minilm-cross-task (SMS spam, TREC, BBC, Rotten Tomatoes; per-task heads).
    Models are cached under $EVOOPT_CACHE/experts (default ~/.cache/evoopt) in
    content-addressed folders, so a second run is instant. Accuracy on dev (used
    for search) and test (reporting only) is printed for every model.
    """
    from dataclasses import replace

    from rich.console import Console

    from evoopt.experts import build_setting, cross_scores, get_setting

    try:
        chosen = get_setting(setting)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    train = replace(chosen.train, steps=steps) if steps else None
    with _Bars(Console(stderr=True)) as bars:
        built = build_setting(setting, progress=bars, limit_train=limit_train, multitask=not no_multitask, train=train)
    _print_expert_scores(built, cross_scores if chosen.shared_head else None)


def _print_expert_scores(built: object, cross: object) -> None:
    from rich.console import Console
    from rich.table import Table

    from evoopt.experts import ExpertSet

    assert isinstance(built, ExpertSet)
    console = Console()
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
        console.print(table)
    seconds = [m.get("train_seconds", 0.0) for m in built.scores().values()]
    console.print(f"training time of the models in this table: {sum(seconds):.0f} s")


@main.command()
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("studies/minilm-sentiment-ties.yaml"), show_default=True,
              help="A merge recipe over the minilm-sentiment-domains models.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo-ties"),
              show_default=True, help="Where to export the merged model.")
def demo(recipe: Path, out: Path) -> None:
    """The main job: build the MiniLM sentiment-domain experts, merge them with TIES, score the merge.

    Runs studies/minilm-sentiment-ties.yaml: fine-tunes one expert per VADER domain
    (cached after the first run), merges them into the shared base with a fixed
    TIES recipe, exports the merged model to --out, and prints dev and test
    accuracy of base, experts, multi-task model and merge on every domain.
    """
    from rich.console import Console
    from rich.table import Table

    from evoopt.experts import build_setting, cross_scores, evaluate_accuracy
    from evoopt.merger import Merger
    from evoopt.recipe import load_recipe

    console = Console(stderr=True)
    with _Bars(console) as bars:
        built = build_setting("minilm-sentiment-domains", progress=bars, multitask=False)
        merger = Merger(load_recipe(recipe), progress=bars)
        model = merger.merge()
        merger.export(out, overwrite=True)
    from transformers import AutoTokenizer

    from evoopt.data import load_splits

    tokenizer = AutoTokenizer.from_pretrained(str(merger.structure.folder))
    setting = built.setting
    for split in ("dev", "test"):
        rows = cross_scores(built, split)
        rows["merged"] = {t: evaluate_accuracy(model, tokenizer, load_splits(t)[split], setting.train)
                          for t in setting.tasks}
        title = "search and selection" if split == "dev" else "reporting only"
        table = Table(title=f"{merger.recipe.method} merge of {len(setting.tasks)} domain experts: "
                            f"accuracy on {split} ({title})")
        table.add_column("model")
        for t in setting.tasks:
            table.add_column(t.removeprefix("vader-"), justify="right")
        table.add_column("mean", justify="right")
        for label, row in rows.items():
            mean = sum(row.values()) / len(row)
            style = "bold" if label == "merged" else None
            table.add_row(label, *[f"{row[t]:.3f}" for t in setting.tasks], f"{mean:.3f}", style=style)
        Console().print(table)
    Console().print(f"merged model written to {out}")


@main.command()
def methods() -> None:
    """List the merge methods, their coefficients and papers."""
    from rich.console import Console
    from rich.table import Table

    from evoopt.merge import available_methods, get_method

    table = Table(title="merge methods")
    for column in ("name", "per-model coefficients", "shared coefficients", "base", "paper"):
        table.add_column(column)
    for name in available_methods():
        method = get_method(name)
        per_model = ", ".join(f"{k}={v}" for k, v in method.per_model.items())
        shared = ", ".join(f"{k}={v}" for k, v in method.shared.items())
        table.add_row(name, per_model, shared, "yes" if method.needs_base else "no", method.paper)
    Console().print(table)


if __name__ == "__main__":
    main()
