"""evoopt's errors: what a user can fix, as one hierarchy.

Every error the library raises for bad input, a missing file or an unreachable service is
an :class:`EvooptError`; the command line prints those as one message and lets anything
else (a bug) surface with its traceback. Each class also derives from the built-in error
that Python code caught before the hierarchy existed (``ValueError`` for bad input,
``FileExistsError`` for an output that exists, ``RuntimeError`` for a failed evaluation),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class EvooptError(Exception):
    """A problem the user can fix; its message names the argument or key, the value and the fix."""


class RecipeError(EvooptError, ValueError):
    """A recipe is invalid; the message lists every problem with its key path."""


class ConfigError(RecipeError):
    """A study config is invalid (or names a study, trial or storage that cannot be used)."""


class StorageError(ConfigError):
    """The study's storage cannot be opened: unknown URL, missing driver, unreachable server."""


class ModelSourceError(EvooptError, ValueError):
    """A model file or folder is missing, unreadable, or incompatible with the others."""


class OutputExistsError(EvooptError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class MissingPackageError(EvooptError, RuntimeError):
    """An asset package (a packaged model or corpus) is not installed."""


class EvaluationError(EvooptError, RuntimeError):
    """A candidate could not be scored (out of memory, a non-finite score): its trial fails, the worker goes on."""


class WorkerError(EvooptError, RuntimeError):
    """A worker cannot go on: worker processes failed, or a generation run elsewhere never ends."""


# --- files of keys (recipes, study configs): every problem at once, with its key path -------------------

def problems(error: type[EvooptError], source: str, lines: list[str]) -> EvooptError:
    """One error listing every problem: ``{source}: N problem(s):`` and a line each."""
    return error(f"{source}: {len(lines)} problem(s):\n  - " + "\n  - ".join(lines))


def schema_problems(error: Any, top: str) -> list[str]:
    """A pydantic ``ValidationError``'s problems, each with its key path (``top`` for the whole mapping)."""
    return [f"{'.'.join(str(p) for p in item['loc']) or top}: {item['msg']}" for item in error.errors()]


def read_yaml(path: Path, error: type[EvooptError], what: str) -> Any:
    """The YAML file's data; a missing file or invalid YAML is ``error``, naming the file."""
    import yaml

    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as problem:
        raise error(f"{path}: not valid YAML ({problem})") from None
