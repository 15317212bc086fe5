"""evoopt's errors: what a user can fix, as one hierarchy.

Every error the library raises for bad input, a missing file or an unreachable service is
an :class:`EvooptError`; the command line prints those as one message and lets anything
else (a bug) surface with its traceback. Each class also derives from the built-in error
that Python code caught before the hierarchy existed (``ValueError`` for bad input,
``FileExistsError`` for an output that exists, ``RuntimeError`` for a failed evaluation),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import re
import types
import typing
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


class OutputError(EvooptError, OSError):
    """The output cannot be written where it was asked for: a file in its path, or a folder without write access."""


class OutputExistsError(EvooptError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class MissingPackageError(EvooptError, RuntimeError):
    """An asset package (a packaged model or corpus) is not installed."""


class EvaluationError(EvooptError, RuntimeError):
    """A candidate could not be scored (out of memory, a non-finite score): its trial fails, the worker goes on."""


class TimeUp(EvaluationError):
    """The run's time ended while a trial waited to begin (for a generation running elsewhere): it fails unrun."""


class WorkerError(EvooptError, RuntimeError):
    """A worker cannot go on: worker processes failed, or a generation run elsewhere never ends."""


# --- files of keys (recipes, study configs): every problem at once, with its key path -------------------

def problems(error: type[EvooptError], source: str, lines: list[str], heading: str | None = None) -> EvooptError:
    """One error listing every problem: ``{source}: N problem(s):`` (or ``heading:``) and a line each."""
    return error(f"{heading or f'{source}: {len(lines)} problem(s)'}:\n  - " + "\n  - ".join(lines))


def schema_problems(error: Any, top: str, model: Any = None) -> list[str]:
    """A pydantic ``ValidationError``'s problems, each with its key path (``top`` for the whole mapping); an unknown
    key of ``model`` (the validated class) with the known key it most looks like, or the known keys."""
    lines: dict[str, str] = {}
    items = error.errors()
    for item in items:
        loc, message = item["loc"], item["msg"]
        if item["type"] == "extra_forbidden" and (known := _keys_at(model, loc[:-1])):
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            message = f"unknown key; did you mean {close[0]!r}?" if close else f"unknown key; known: {', '.join(known)}"
        elif item["type"] == "tuple_type" or item["type"] in ("too_long", "too_short") and message.startswith(
                "Tuple") or item["type"] == "missing" and loc and isinstance(loc[-1], int):
            # (every tuple of the schemas is a pair of bounds; a list too short or long keeps pydantic's words)
            loc, message = loc[:-1] if item["type"] == "missing" else loc, \
                f"expected bounds [low, high], got {item['input']!r}"
        elif item["type"] in ("model_type", "dict_type") and (known := _keys_at(model, loc)):
            message = f"expected a mapping (keys: {', '.join(known)}), got {item['input']!r}"
        union = [i for i in items if i["loc"][:-1] == loc[:-1] and i["input"] == item["input"]]
        if loc and len({i["msg"] for i in union}) > 1 and not {i["loc"][-1] for i in union} & set(
                _keys_at(model, loc[:-1])):  # a union's members (not keys) each refused the value: one line
            loc = loc[:-1]
            message = f"got {item['input']!r}; expected " + " or ".join(
                dict.fromkeys(i["msg"].removeprefix("Input should be ").split(",")[0] for i in union))
        lines.setdefault(key_path(loc) or top, message)
    return [f"{where}: {message}" for where, message in lines.items()]


def key_path(loc: collections.abc.Sequence[Any]) -> str:
    """A key path as the messages write it: ``sources.models[1]`` (pydantic's is ``sources.models.1``)."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _keys_at(model: Any, path: tuple[Any, ...]) -> list[str]:
    """The keys of the pydantic model reached from ``model`` by ``path`` (through fields, optional ones, mappings
    and lists of models); [] where the path leads to no model."""
    current = _optional_removed(model)
    for key in path:
        fields = getattr(current, "model_fields", None)
        if isinstance(fields, dict) and isinstance(current, type):
            current = fields[key].annotation if key in fields else None
        elif typing.get_origin(current) in (dict, list):  # a mapping's value, a list's item
            current = typing.get_args(current)[-1]
        else:
            return []
        current = _optional_removed(current)
    fields = getattr(current, "model_fields", None)
    return list(fields) if isinstance(fields, dict) else []


def _optional_removed(annotation: Any) -> Any:
    """``X | None``'s X (an annotation as it is otherwise)."""
    while typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), None)
    return annotation


def read_yaml(path: Path, error: type[EvooptError], what: str) -> Any:
    """The YAML file's data; a missing, unreadable, empty or non-UTF-8 file, invalid YAML or a key given twice
    in one mapping (YAML keeps the last silently) is ``error``, naming the file. ``1e-4`` is a number (YAML 1.2)."""
    import yaml

    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())  # a SafeLoader
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not UTF-8 text ({problem}); save the {what} as UTF-8") from None
    except OSError as problem:
        raise error(f"{path}: cannot read the {what} ({problem.strerror or problem})") from None
    except yaml.YAMLError as problem:
        raise error(f"{path}: not valid YAML ({problem})") from None
    if data is None:
        raise error(f"{path}: the {what} is empty; write its keys (see the README)")
    return data


@functools.cache
def _unique_key_loader() -> Any:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """YAML's safe loader, refusing a key given twice in one mapping."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # ``<<: *anchor``: its keys may be given again, on purpose
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, collections.abc.Hashable):
                    continue  # the safe loader's own error names it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice; keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    # YAML 1.2's floats: PyYAML (YAML 1.1) reads 1e-4, 1e3 or 1.5e3 (no dot, or no exponent sign) as text, which a
    # sampler option or a count then gets as text
    UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"), list("-+.0123456789"))
    return UniqueKeyLoader
