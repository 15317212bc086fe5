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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


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
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from evoopt.io import ModelSourceError
    from evoopt.merger import Merger
    from evoopt.recipe import RecipeError, load_recipe

    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        parsed = load_recipe(recipe)
        if device is not None:
            parsed.device = device  # type: ignore[assignment]
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            tasks: dict[str, int] = {}

            def report(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done)

            merger = Merger(parsed, progress=report)
            merger.merge()
            bar.add_task("exporting", total=None)
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
