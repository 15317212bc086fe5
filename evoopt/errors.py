"""evoopt's errors: what a user can fix, as one hierarchy.

Every error the library raises for bad input, a missing file or an unreachable service is
an :class:`EvooptError`; the command line prints those as one message and lets anything
else (a bug) surface with its traceback. Each class also derives from the built-in error
that Python code caught before the hierarchy existed (``ValueError`` for bad input,
``FileExistsError`` for an output that exists, ``RuntimeError`` for a failed evaluation),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations


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
