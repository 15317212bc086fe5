"""Search spaces: a trial's parameters decode to a plain merge recipe.

A space names its Optuna parameters readably (``vader-tweets.weight``, or
``vader-tweets.layers.02.density`` for the layer-wise space of Akiba et al. 2024), samples
them from the distributions' own bounds, and turns any parameter mapping (a live
trial's, or a finished trial's ``params``) into a :class:`~evoopt.merge.recipe.Recipe`
that ``evoopt merge`` and ``evoopt export`` accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from evoopt.data.experts import HEAD_PATTERNS
from evoopt.errors import ConfigError
from evoopt.merge import get_method
from evoopt.merge.recipe import Recipe, RecipeError, block_position, parse_recipe, tensor_group
from evoopt.models.paths import LayerPath, decode_path
from evoopt.search.evolver import ATTR, Move, move_of
from evoopt.study.config import StudyConfig


@dataclass(frozen=True)
class Sources:
    """The models of a study: a base, one expert per label, and the tasks they are scored on."""

    base: str | None
    models: tuple[str, ...]
    labels: tuple[str, ...]  # readable names of the models, used in parameter names
    tasks: tuple[str, ...]
    per_task_heads: bool
    kind: str  # encoder or causal
    root: Path
    # the seed of the corpora's train/dev/test split the experts were trained on: dev and test are scored on
    # that split whatever the study's seed (another seed's dev and test would hold the experts' training rows)
    data_seed: int = 0

    @property
    def exclude(self) -> list[str]:
        return list(HEAD_PATTERNS) if self.per_task_heads else []


def study_sources(config: StudyConfig) -> Sources:
    if config.setting is not None:
        from evoopt.data.experts import get_setting

        setting = get_setting(config.setting)
        return Sources(f"expert:{setting.name}/base", tuple(f"expert:{setting.name}/{t}" for t in setting.tasks),
                       setting.tasks, setting.tasks, not setting.shared_head, setting.kind, config.root,
                       setting.data_seed)
    assert config.sources is not None
    labels = tuple(Path(m.split(":")[-1]).name or f"m{i}" for i, m in enumerate(config.sources.models))
    if len(set(labels)) < len(labels):
        labels = tuple(f"m{i}" for i in range(len(labels)))
    kind = "causal" if config.objective.kind == "lm-eval" or config.objective.metric == "perplexity" else "encoder"
    return Sources(config.sources.base, tuple(config.sources.models), labels, tuple(config.sources.tasks),
                   False, kind, config.root)


def fixed_recipe(sources: Sources, method: str, parameters: dict[str, Any] | None = None,
                 per_model: list[dict[str, Any]] | None = None, *, config: StudyConfig,
                 calibration: str | None = None) -> Recipe:
    """A recipe over the study's sources."""
    data: dict[str, Any] = {
        "method": method,
        "models": [{"model": m, "parameters": (per_model or [{}] * len(sources.models))[i]}
                   for i, m in enumerate(sources.models)],
        "parameters": dict(parameters or {}),
        "seed": config.seed, "dtype": config.dtype, "device": config.device, "exclude": sources.exclude,
        "memory_budget": config.memory_budget,
    }
    if sources.base is not None:
        data["base"] = sources.base
    if calibration is not None:  # a small set: Fisher takes one backward pass per example and model
        data["calibration"] = {"texts": calibration, "max_examples": 32, "max_length": 64}
    return parse_recipe(data, root=sources.root, source=f"{method} recipe")


@dataclass(frozen=True)
class Unit:
    """A group of tensors that shares one value of each searched coefficient per model."""

    name: str  # readable, in parameter names: "layers.00-01", "embed"; "" for the global space
    patterns: tuple[str, ...]  # recipe patterns of its tensors ("*" for the global space)
    tensor: str  # one of its tensors, to read a recipe's value for it back


_LOOKED_FOR = ("tensor names with a block index after 'layers.', 'layer.', 'h.', 'blocks.' or 'block.' "
               "(Llama/Mistral/Qwen/Gemma model.layers.N, GPT-2 transformer.h.N, BERT encoder.layer.N, "
               "T5 encoder.block.N and decoder.block.N)")
_ORDER = {"embed": 0, "norm": 2, "head": 3, "other": 4}


def layer_units(names: list[str], *, per_group: int = 1, split: bool = False, model: str = "the model") -> list[Unit]:
    """Embeddings, groups of ``per_group`` consecutive blocks (optionally attention and MLP apart), norm, head."""
    others: dict[str, str] = {}  # group outside the blocks -> its first tensor
    blocks: dict[tuple[str, str], dict[int, str]] = {}  # (stack, part) -> block index -> its first tensor
    for name in names:
        position = block_position(name)
        if position is None:
            others.setdefault(tensor_group(name), name)
        else:
            stack, index, part = position
            blocks.setdefault((stack, f".{part}" if split else ""), {}).setdefault(index, name)
    if not blocks:
        raise RecipeError(f"space.kind layerwise: no transformer blocks found in {model}: looked for {_LOOKED_FOR}; "
                          f"its tensors are named like {', '.join(names[:3])}")
    units = [Unit(group, (group,), tensor) for group, tensor in others.items()]
    for (stack, part), first in blocks.items():
        indices = sorted(first)
        for i in range(0, len(indices), per_group):
            chunk = indices[i: i + per_group]
            span = f"{chunk[0]:02d}" if len(chunk) == 1 else f"{chunk[0]:02d}-{chunk[-1]:02d}"
            patterns = tuple(f"{stack}layers.{j:02d}{part}" for j in chunk)
            units.append(Unit(f"{stack}layers.{span}{part}", patterns, first[chunk[0]]))
    return sorted(units, key=lambda u: (_ORDER.get(u.name, 1), u.name.startswith("decoder."), u.name))


class Space:
    """Searched coefficients per model and unit: one unit (global) or one per layer group (layerwise).

    Parameters are named ``<model>.<coefficient>`` (global) or ``<model>.<unit>.<coefficient>``
    (layerwise, e.g. ``vader-tweets.layers.02.density``), with the bounds of ``space.search``, after
    ``prefix`` (the method search's ``<method>:``).
    """

    def __init__(self, config: StudyConfig, sources: Sources, units: list[Unit] | None = None, *,
                 prefix: str = "") -> None:
        self.config = config
        self.sources = sources
        self.units = units or [Unit("", ("*",), "")]
        self.layerwise = units is not None
        spec = config.space
        self.names: dict[str, tuple[int, Unit, str]] = {}  # parameter -> (model index, unit, coefficient)
        for index, label in enumerate(sources.labels):
            for unit in self.units:
                for key in spec.search:
                    self.names[prefix + ".".join(p for p in (label, unit.name, key) if p)] = (index, unit, key)
        self.distributions = {
            name: optuna.distributions.FloatDistribution(*spec.search[key], log=key in spec.log)
            for name, (_, _, key) in self.names.items()
        }

    def suggest(self, trial: optuna.Trial) -> Recipe:
        return self.recipe({name: trial.suggest_float(name, d.low, d.high, log=d.log)
                            for name, d in self.distributions.items()})

    def recipe(self, params: dict[str, Any]) -> Recipe:
        """The plain recipe of a parameter mapping (a live trial's, or a finished trial's ``params``)."""
        per_model: list[dict[str, Any]] = [{} for _ in self.sources.labels]
        for name, (index, unit, key) in self.names.items():
            if not self.layerwise:
                per_model[index][key] = params[name]
                continue
            values = per_model[index].setdefault(key, {})
            values.update(dict.fromkeys(unit.patterns, params[name]))
        return fixed_recipe(self.sources, self.config.space.method, self.config.space.fixed, per_model,
                            config=self.config)

    def params(self, recipe: Recipe) -> dict[str, float]:
        """The parameters that decode to ``recipe``'s coefficients (a warm start from a recipe)."""
        count = len(self.sources.labels)
        if len(recipe.models) != count:
            raise RecipeError(f"recipe: has {len(recipe.models)} models, the study merges {count}")
        params = {}
        for name, (index, unit, key) in self.names.items():
            value = recipe.coefficients(unit.tensor, count)[key][index]
            low, high = self.distributions[name].low, self.distributions[name].high
            if not low <= value <= high:
                raise RecipeError(f"recipe: {key} of models[{index}] ({unit.name or 'all tensors'}) is {value}, "
                                  f"outside space.search.{key} [{low}, {high}]")
            params[name] = value
        return params

    def default(self) -> Recipe:
        """The centre of the space: what the evaluation model is built from before any trial."""
        mid = {name: (d.low * d.high) ** 0.5 if d.log else (d.low + d.high) / 2
               for name, d in self.distributions.items()}
        return self.recipe(mid)


    def sampler_options(self) -> dict[str, Any]:
        """What a sampler that takes them is given: the distributions, so it samples the first trial too."""
        return {"search_space": dict(self.distributions)}


@dataclass(frozen=True)
class Candidate:
    """One Evolver trial: generation 0 scores an initial individual (or their merge), later ones an offspring,
    or (X_Evolver, ``target`` = the population's size, no move) the generation's winning offspring together."""

    generation: int
    target: int
    move: Move | None


class EvolverSpace:
    """``space.kind: evolver``: a trial is one offspring of the Evolver's population (Du et al. 2024).

    :class:`~evoopt.search.evolver.EvolverSampler` decides every parameter; the individuals are the
    experts, and ``space.method`` is X of X_Evolver (``none``: the plain Evolver), with the
    coefficients of ``space.fixed``.
    """

    def __init__(self, config: StudyConfig, sources: Sources) -> None:
        self.config, self.sources = config, sources
        self.method = None if config.space.method == "none" else config.space.method
        self.size = len(sources.models)

    def sampler_options(self) -> dict[str, Any]:
        # (not the planned generations of the released strategy: they would follow `trials`, which may
        # change between runs of one study, and so would the moves)
        return {"population": self.size, "integrated": self.method is not None}

    def default(self) -> Recipe:
        """The evaluation model's recipe: a plain average, which needs no preprocessing."""
        return fixed_recipe(self.sources, "linear", {}, [{"weight": 1.0}] * self.size, config=self.config)

    def merge_recipe(self, calibration: str | None = None) -> Recipe | None:
        """X's recipe over the experts (its coefficients apply to any population), or None for plain Evolver.

        ``calibration``: a file of training texts, for X that needs statistics (Fisher, RegMean).
        """
        if self.method is None:
            return None
        per_model = {k: v for k, v in self.config.space.fixed.items() if k in get_method(self.method).per_model}
        shared = {k: v for k, v in self.config.space.fixed.items() if k not in per_model}
        return fixed_recipe(self.sources, self.method, shared, [per_model] * self.size, config=self.config,
                            calibration=calibration)

    def suggest(self, trial: optuna.Trial) -> Candidate:
        """Read the trial's move (the sampler chose it when the first parameter was asked for)."""
        target = trial.suggest_int("target", 0, self.size - (self.method is None))  # (X_Evolver: N, together)
        slot = trial.study._storage.get_trial_system_attrs(trial._trial_id).get(ATTR)
        if slot is None:
            raise ConfigError("space.kind evolver: the trial has no generation; sampler.name must be EvolverSampler")
        generation = int(slot["generation"])
        if generation == 0 or target == self.size:
            return Candidate(generation, target, None)
        donors = 1 if slot["strategy"] == "released" else 3
        params: dict[str, Any] = {"target": target, "F": trial.suggest_float("F", 0.0, 2.0),
                                  "Cr": trial.suggest_float("Cr", 0.0, 1.0),
                                  "seed": trial.suggest_int("seed", 0, 2**31 - 1)}
        for k in range(1, donors + 1):
            params[f"donor_{k}"] = trial.suggest_int(f"donor_{k}", 0, self.size - 1)
        return Candidate(generation, target, move_of(params, slot["strategy"]))

    def recipe(self, params: dict[str, Any]) -> Recipe:
        """An Evolver candidate is weights, not coefficients: there is no recipe to give."""
        raise RecipeError("trial: an Evolver trial's model is made of evolved weights, not a recipe; "
                          "save it with `evoopt export STUDY --trial best --out DIR` and use that folder")

    def candidate(self, trial: optuna.trial.FrozenTrial) -> Candidate:
        """A finished trial's candidate, from its stored parameters."""
        slot = trial.system_attrs.get(ATTR)
        if slot is None:
            raise ConfigError(f"trial {trial.number} is not an Evolver trial (it has no {ATTR!r} attribute)")
        generation = int(slot["generation"])
        target = int(trial.params.get("target", 0))
        move = move_of(trial.params, slot["strategy"]) if generation and target < self.size else None
        return Candidate(generation, target, move)


class DfsSpace:
    """``space.kind: dfs``: which layers of which pool models a token passes through, with scales.

    Akiba et al. (2024)'s data-flow space: the pool's layers laid out in order (all of A's,
    then B's, ...) and repeated ``space.repeats`` times make T = M x r slots; parameter
    ``I.<t>`` puts slot t's layer on the path when it is > 0 (or 1, ``space.binary``). The
    scales are ``W.<i>.<j>`` per pair of layers (``W.<M>.<j>``: the embeddings) with
    ``space.scaling: matrix``, or ``W.<from>.<to>`` per pair of models (``from`` may be
    ``embed``) with ``function``, where a model's own next layer keeps scale 1.
    Models are named A, B, C... in the pool's order.
    """

    def __init__(self, config: StudyConfig, sources: Sources) -> None:
        self.config, self.sources = config, sources
        spec = config.space
        self.pool = tuple(spec.pool or sources.models)
        self.labels = tuple(chr(ord("A") + i) for i in range(len(self.pool)))
        self.layers = tuple(pool_layers(ref, config.root) for ref in self.pool)
        self.size = sum(self.layers)  # M
        self.slots = self.size * spec.repeats  # T
        self.layout = [(m, layer) for m, count in enumerate(self.layers) for layer in range(count)]
        dists = optuna.distributions
        indicator = dists.IntDistribution(0, 1) if spec.binary else dists.FloatDistribution(-1, 1)
        self.distributions: dict[str, dists.BaseDistribution] = {f"I.{t:03d}": indicator for t in range(self.slots)}
        scale = dists.FloatDistribution(*spec.scales)
        if spec.scaling == "matrix":
            pairs = [(f"{i:03d}", f"{j:03d}") for i in range(self.size + 1) for j in range(self.size)]
        else:
            pairs = [(a, b) for a in ("embed", *self.labels) for b in self.labels]
        self.distributions.update({f"W.{a}.{b}": scale for a, b in pairs})

    def sampler_options(self) -> dict[str, Any]:
        """The distributions, and A's own path (every layer once, scales 1) as CMA-ES's initial mean."""
        return {"search_space": dict(self.distributions), "x0": self.identity()}

    def identity(self) -> dict[str, float]:
        """Parameters of A's own path: the first layout's A slots on (at 0.75, or 1), the rest off, scales 1."""
        on, off = (1, 0) if self.config.space.binary else (0.75, -0.75)
        params: dict[str, float] = {name: 1.0 for name in self.distributions if name.startswith("W.")}
        params.update({f"I.{t:03d}": on if t < self.layers[0] else off for t in range(self.slots)})
        return params

    def suggest(self, trial: optuna.Trial) -> LayerPath:
        params: dict[str, Any] = {}
        for name, d in self.distributions.items():
            if isinstance(d, optuna.distributions.IntDistribution):
                params[name] = trial.suggest_int(name, d.low, d.high)
            elif isinstance(d, optuna.distributions.FloatDistribution):
                params[name] = trial.suggest_float(name, d.low, d.high)
        return self.path(params)

    def path(self, params: dict[str, Any]) -> LayerPath:
        """The path a parameter mapping describes (a live trial's, or a finished trial's ``params``)."""
        indicators = [params[f"I.{t:03d}"] - (0.5 if self.config.space.binary else 0.0) for t in range(self.slots)]
        return decode_path(indicators, self.scales(params), self.layers)

    def scales(self, params: dict[str, Any]) -> list[list[float]]:
        """The (M + 1) x M scaling matrix (row M: the embeddings)."""
        if self.config.space.scaling == "matrix":
            return [[params[f"W.{i:03d}.{j:03d}"] for j in range(self.size)] for i in range(self.size + 1)]
        source = [*self.layout, (0, -1)]  # row M: the embeddings, which flow naturally into A's first layer
        rows = []
        for i, (m, layer) in enumerate(source):
            row = []
            for n, other in self.layout:
                natural = (m, layer + 1) == (n, other)
                name = "embed" if i == self.size else self.labels[m]
                row.append(1.0 if natural else params[f"W.{name}.{self.labels[n]}"])
            rows.append(row)
        return rows

    def describe(self, path: LayerPath) -> str:
        """A path as runs of consecutive layers, ``A0-11 B12-29 A5-9``, with the scales that are not 1."""
        runs: list[list[int]] = []  # [model, first layer, last layer]
        for m, layer in path.hops:
            if runs and runs[-1][0] == m and runs[-1][2] + 1 == layer:
                runs[-1][2] = layer
            else:
                runs.append([m, layer, layer])
        text = " ".join(f"{self.labels[m]}{a}" + (f"-{b}" if b > a else "") for m, a, b in runs)
        scaled = [f"{t}:{s:.3g}" for t, s in enumerate(path.scales) if s != 1.0]
        return f"{text} ({len(path.hops)} layers" + (f"; scales at hops {', '.join(scaled)})" if scaled else ")")


def pool_layers(reference: str, root: Path) -> int:
    """The number of decoder layers of a pool model (``study:OTHER.yaml``: of that study's sources)."""
    from evoopt.models.io import open_source, resolve_path

    if reference.startswith("study:"):
        from evoopt.study.config import KIND_IN_POOLS, load_config

        other = load_config(resolve_path(reference.removeprefix("study:"), root))
        if not KIND_IN_POOLS.get(other.space.kind, True):
            raise ConfigError(f"space.pool: {reference} is a data-flow study, whose answer is a path of its own "
                              "length through its pool, not a model of its sources' layers; a pool takes model "
                              "folders or a parameter-space study (PS+DFS)")
        return pool_layers(study_sources(other).models[0], other.root)
    config = open_source(resolve_path(reference, root)).config or {}
    if "num_hidden_layers" not in config:
        raise RecipeError(f"space.pool: {reference} has no num_hidden_layers in its config.json; a data-flow "
                          "space needs decoder models (Llama, Mistral, Qwen2, Gemma...)")
    return int(config["num_hidden_layers"])
