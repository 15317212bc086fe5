"""Study configs: one YAML file says what to merge, how to search, and how to score.

::

    name: minilm-sentiment-ties
    setting: minilm-sentiment-domains   # or sources: {base: ..., models: [...], tasks: [...]}
    space: {kind: global, method: ties, search: {weight: [0.0, 1.5], density: [0.1, 1.0]}}
    sampler: {name: TPESampler}
    objective: {kind: dev, metric: accuracy, limit: 300}
    trials: 30

Every problem (unknown keys, wrong types, unknown sampler, inverted bounds, a test
split as the objective) is reported at once, with the key path of each.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from evoopt.data.outcomes import LOSSES
from evoopt.errors import ConfigError, problems, read_yaml, schema_problems

if TYPE_CHECKING:
    from evoopt.merge import MergeMethod

# what may change between runs of one study without making it a different study
RUNTIME_KEYS = ("trials", "timeout", "device", "storage", "artifacts", "heartbeat_interval", "grace_period",
                "memory_budget")
MINIMIZE = LOSSES  # metrics that are per-example losses are minimised

Check = Callable[["StudyConfig"], list[str]]
# space.kind -> the kind's own config check; filled by evoopt.study.kinds, which the evoopt.study package
# imports first, so the checks are registered whenever this module is used. Every kind's check runs on
# every config (a kind also refuses its keys in another kind's study).
KIND_CHECKS: dict[str, Check] = {}
# space.kind -> whether its models read calibration texts (Kind.calibrated), filled the same way
KIND_CALIBRATED: dict[str, Callable[[StudyConfig], bool]] = {}
# space.kind -> the space keys that kind alone (with the others naming them) reads (Kind.keys), filled the same way
KIND_KEYS: dict[str, tuple[str, ...]] = {}
# space.kind -> whether its answer is a model a data-flow pool may take (Kind.in_pools), filled the same way
KIND_IN_POOLS: dict[str, bool] = {}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourcesSpec(_Strict):
    """Models named directly instead of through a benchmark setting."""

    base: str | None = Field(None, description="the pretrained model the experts were fine-tuned from")
    models: list[str] = Field(min_length=2)
    tasks: list[str] = Field(default_factory=list, description="corpora to score on (evoopt.data.corpora names)")

    def references(self) -> list[tuple[str, str]]:
        """Each model reference given, with its key (``sources.base``, ``sources.models[i]``)."""
        named = [("sources.base", self.base)] + [(f"sources.models[{i}]", m) for i, m in enumerate(self.models)]
        return [(key, reference) for key, reference in named if reference is not None]


class MethodChoice(_Strict):
    """One method of a method search (``space.kind: methods``): its searched coefficients and fixed ones."""

    search: dict[str, tuple[float, float]] = Field(description="per-model coefficients searched, [low, high]")
    fixed: dict[str, Any] = Field(default_factory=dict, description="recipe parameters that are not searched")
    log: list[str] = Field(default_factory=list, description="coefficients searched on a log scale")
    start: dict[str, float] = Field(default_factory=dict, description=(
        "a known-good value of each searched coefficient (the same for every model and layer group): the "
        "study's first trial of this method, before the sampler's own"))


class SpaceSpec(_Strict):
    kind: str = Field("global", description=(
        "global: one value per model and coefficient; layerwise: one per model, coefficient and layer "
        "group (embeddings, each group of blocks, final norm and head are groups of their own); "
        "evolver: the experts' weights themselves, evolved by EvolverSampler (Du et al. 2024); "
        "m2n2: an archive of models evolved by M2N2Sampler (Abrantes et al. 2025); "
        "dfs: the path of layers a token takes through the pool's models, with scales (Akiba et al. 2024); "
        "methods / methods-layerwise: the merge method is searched too, each with its own coefficients "
        "(space.methods); the kinds are registered in evoopt.study.kinds"))
    method: str = Field("ties", description="the merge method; evolver: X of X_Evolver, or 'none' for plain Evolver")
    search: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"weight": (0.0, 1.5), "density": (0.1, 1.0)},
        description="per-model coefficients searched, with their [low, high] bounds")
    fixed: dict[str, Any] = Field(default_factory=dict, description="recipe parameters that are not searched")
    log: list[str] = Field(default_factory=list, description="coefficients searched on a log scale")
    layers_per_group: int = Field(1, gt=0, description="layerwise: consecutive blocks that share coefficients")
    split_blocks: bool = Field(False, description="layerwise: a block's attention and MLP as separate groups")
    population: Literal["memory", "mmap"] = Field("memory", description=(
        "evolver, m2n2: keep the individuals (the archive) in RAM, or in memory-mapped safetensors files in "
        "the artifacts folder"))
    pool: list[str] = Field(default_factory=list, description=(
        "dfs: the models whose layers the path may take, A first (its embeddings, final norm and head are "
        "used); 'study:OTHER.yaml' is the best model of another study (PS+DFS). Default: the sources"))
    repeats: int = Field(3, gt=0, description="dfs: r, how many times the layout of all layers is repeated")
    scaling: Literal["function", "matrix"] = Field("function", description=(
        "dfs: 'matrix': a free scale W[i, j] per pair of layers (and the embeddings), as in the paper; "
        "'function': one scale per pair of models for every transition but the model's own next layer "
        "(which keeps 1): (K + 1) x K parameters for K models instead of (M + 1) x M"))
    scales: tuple[float, float] = Field((0.0, 2.0), description="dfs: the bounds of every scale")
    binary: bool = Field(False, description=(
        "dfs: indicators as 0/1 integers (CMA-ES with margin) instead of continuous values on when > 0"))
    seeds: list[str] = Field(default_factory=list, description=(
        "m2n2: merges of the experts that join them in the first archive, by method name (ties, dare_ties, "
        "della, tsv, iso_cts, with the method search's known-good coefficients), e.g. [ties]"))
    methods: dict[str, MethodChoice] = Field(default_factory=dict, description=(
        "methods: the methods searched, each with its coefficients (default: ties, dare_ties, della, tsv, iso_cts "
        "with the bounds and known-good starts of evoopt.study.kinds.methods.DEFAULT_METHODS)"))


class SamplerSpec(_Strict):
    name: str = Field("TPESampler", description="any optuna.samplers class name, e.g. TPESampler, RandomSampler")
    options: dict[str, Any] = Field(default_factory=dict)


class PrunerSpec(_Strict):
    name: str = Field("NopPruner", description=(
        "any optuna.pruners class name (MedianPruner, HyperbandPruner...), or evoopt's RacingPruner"))
    options: dict[str, Any] = Field(default_factory=dict)


class EstimateSpec(_Strict):
    """Estimated fitness: each trial is scored on a few informative dev examples (evoopt.data.estimate)."""

    method: Literal["anchor", "strata", "mixture", "irt", "random"] = Field("anchor", description=(
        "anchor: anchor points (clusters of the baselines' results, medoids weighted by cluster size); "
        "strata: anchor points over the examples the references disagree on, the rest counted at the "
        "references' shared result (right-or-wrong outcomes; best with references: 20); "
        "mixture: strata's examples, the candidate fitted as a mixture of the references on them and the "
        "other examples predicted from it (right-or-wrong outcomes; fitted on each example's margin where the "
        "scorer keeps it: evoopt's classifiers and lm-eval multiple choice; with references: 20 it ranked search "
        "candidates best at 10 % of dev in every measured setting: Kendall tau .89, .87 and .93 on margins on the "
        "sentiment domains, SmolLM2 and across tasks, where a random half of dev reaches .66, .79 and .94); "
        "irt: item response theory anchors and the p-IRT estimate (accuracy only); random: a random subset"))
    fraction: float = Field(0.1, gt=0, le=1, description="the share of each task's dev examples a trial is scored on")
    references: int = Field(0, ge=0, description=(
        "the study's first N trials are scored on the whole dev set and join the baselines as the estimator's "
        "references (measured on minilm-sentiment-domains: anchor points at 10 % of dev ranked search candidates "
        "with Kendall tau .60 from the baselines alone and .82 with 20 such trials; 20 is a good start; with mixture "
        "on margins 10 to 40 rank within .06 of tau of each other)"))
    confirm: int = Field(5, ge=0, description=(
        "at the end of a run, the N best trials by estimated score are scored on the whole dev set and the "
        "study's answer is the best by that score of every trial confirmed so far (the best estimate is often an "
        "overestimate: the winner's curse); 0: the answer is the best estimate"))
    answer_level: float | None = Field(None, gt=0, lt=0.5, description=(
        "with confirm: the answer changes only when a newly confirmed trial is better than it by a one-sided "
        "paired test on their whole-dev per-example outcomes at this level (e.g. 0.05), so that a later report "
        "does not trade the answer for a trial a few dev examples better, which is dev's noise; with "
        "promote_within each promoted trial challenges the answer of its time in turn, so the test holds at every "
        "moment of a run (the first answer: the best reference trial, else the first promoted); default: the best "
        "whole-dev score of every trial confirmed so far"))
    promote_within: float | None = Field(None, ge=0, description=(
        "confirm as the search goes: a trial whose estimate is better than the best whole-dev score of the "
        "study's trials so far, or within this much of it (in the score's units: 0.005 is half a point of "
        "accuracy), is scored on the whole dev set at once and that score is its value (the first estimated "
        "trial, with none scored on the whole dev set yet, always is). The promotions are inside the run's "
        "--timeout, the study's answer is the best whole-dev trial at every moment, and the sampler sees the "
        "whole-dev values of the candidates that matter; with confirm: 0 nothing is scored after the run. "
        "Default: off"))


class ObjectiveSpec(_Strict):
    kind: Literal["dev", "lm-eval"] = Field(
        "dev", description="dev: evoopt's own batched scoring; lm-eval: lm-evaluation-harness tasks")
    metric: Literal["accuracy", "macro_f1", "mse", "perplexity"] = "accuracy"
    split: Literal["dev", "test"] = "dev"
    allow_test: bool = Field(False, description="allow searching on the test split (never do this for reporting)")
    limit: int | None = Field(300, gt=0, description="examples per task (a fixed, seeded subset)")
    test_limit: int | None = Field(None, gt=0, description="examples per task for test reporting (default all)")
    fidelities: list[int] = Field(default_factory=list, description=(
        "growing numbers of examples per task at which intermediate scores are reported to the pruner"))
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(64, description=(
        "examples a forward pass scores at once (all splits); auto: 64 on a CPU, on a GPU half the largest power "
        "of two (up to 512) whose forward pass on objective.max_length tokens fits, found once per worker"))
    max_length: int = Field(128, gt=0)
    multi_objective: bool = Field(False, description="one objective per task (for NSGA-II and friends)")
    tasks: list[str] = Field(default_factory=list, description=(
        "lm-eval: registered task names or tasks of include_path, scored on disjoint seeded halves of their "
        "documents for dev and test; default the setting's local tasks"))
    include_path: str | None = None
    weights: dict[str, float] = Field(default_factory=dict, description="task weights of the score (default 1)")
    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "trials' scoring precision; auto: bfloat16 autocast where the sources' dev results under it match "
        "float32 (checked with the baselines, kept in the study), else float32; baselines and reports: float32"))
    estimate: EstimateSpec | None = Field(None, description=(
        "score trials on a few dev examples and estimate their full-dev score; fitted once per study from the "
        "baselines' per-example results on dev (needs baselines), stored in the study"))


def shown_url(url: str) -> str:
    """A storage URL for what is printed, its password masked (``postgresql://u:***@host/db``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL (a journal path): as given
        return url


class StudyConfig(_Strict):
    name: str = Field(min_length=1)
    setting: str | None = Field(None, description="a benchmark setting of `evoopt experts`")
    sources: SourcesSpec | None = None
    space: SpaceSpec = Field(default_factory=lambda: SpaceSpec())
    sampler: SamplerSpec = Field(default_factory=lambda: SamplerSpec())
    objective: ObjectiveSpec = Field(default_factory=lambda: ObjectiveSpec())
    pruner: PrunerSpec = Field(default_factory=lambda: PrunerSpec())
    trials: int = Field(30, gt=0, description="finished trials the study should have")
    timeout: float | None = Field(None, gt=0, description=(
        "seconds after which one `run` starts no new trial, counted after the baselines"))
    seed: int = Field(0, description=(
        "seeds the sampler and the merges' random draws (DARE's masks); dev and test are always the experts' "
        "own split (the setting's data seed), whatever this seed"))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    memory_budget: float | None = Field(None, gt=0, description=(
        "GiB the merges' preprocessed state may take; larger, the sources are streamed from their files "
        "(default: the memory available when a worker starts)"))
    storage: str | None = Field(None, description="an Optuna storage URL; default sqlite in the artifacts folder")
    artifacts: str = Field("out/studies", description="folder for the default storage, artifacts and plots")
    baselines: list[str] = Field(
        default_factory=lambda: ["sources", "ensemble", "greedy-soup", "linear", "task_arithmetic", "ties",
                                 "dare_ties", "fisher", "regmean"],
        description="what `baselines` evaluates")
    heartbeat_interval: int = Field(10, gt=0, description="seconds between a running trial's heartbeats")
    grace_period: int = Field(60, gt=0, description="seconds without heartbeat before a trial counts as dead")
    _root: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="study")

    @property
    def root(self) -> Path:
        """The config file's folder: relative source paths are relative to it."""
        return self._root

    @property
    def source(self) -> str:
        """Where the config was read (its file's path as given), to head the problems found later."""
        return self._source

    @property
    def artifact_dir(self) -> Path:
        return Path(self.artifacts) / self.name

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.artifact_dir / 'evoopt.db').as_posix()}"

    @property
    def storage_shown(self) -> str:
        """The storage URL for what is printed: its password masked."""
        return shown_url(self.storage_url)

    @property
    def scored_tasks(self) -> list[str]:
        """The tasks a trial's scores name: :attr:`task_names`, and with lm-eval on the local tasks each corpus's
        generative task beside its choices (``trec-coarse_gen``), which its mean takes too."""
        if self.objective.kind == "lm-eval" and not self.objective.tasks:
            from evoopt.data.corpora import lm_eval_scored

            return lm_eval_scored(self.task_names)
        return self.task_names

    @property
    def directions(self) -> list[Literal["minimize", "maximize"]]:
        minimize = self.objective.metric in MINIMIZE
        direction: Literal["minimize", "maximize"] = "minimize" if minimize else "maximize"
        return [direction] * (len(self.scored_tasks) if self.objective.multi_objective else 1)

    @property
    def metric_names(self) -> list[str]:
        """What each objective is, for optuna-dashboard and Optuna's plots (instead of "Objective 0")."""
        o = self.objective
        metric = f"{o.split} {o.metric}"
        if o.multi_objective:
            return [f"{metric} {task}" for task in sorted(self.scored_tasks)]  # the order of Worker.value
        tasks = len(self.scored_tasks)
        mean = "weighted mean" if o.weights else "mean"
        return [f"{metric} ({mean} of {tasks} tasks)" if tasks > 1 else metric]

    @property
    def task_names(self) -> list[str]:
        if self.objective.kind == "lm-eval" and self.objective.tasks:
            return list(self.objective.tasks)
        if self.sources is not None:
            return list(self.sources.tasks)
        from evoopt.data.settings import get_setting

        return list(get_setting(self.setting or "").tasks)

    def identity(self) -> dict[str, Any]:
        """What makes two configs the same study: everything but the run-time keys (and ``objective.batch_size``,
        which a run out of memory lowers: it changes a score by floating-point rounding alone)."""
        identity = {k: v for k, v in self.model_dump(mode="json").items() if k not in RUNTIME_KEYS}
        identity["objective"] = {k: v for k, v in identity["objective"].items() if k != "batch_size"}
        return identity


def _problems(config: StudyConfig, *, unread: bool = False) -> list[str]:
    """Every problem of a config that passed its schema, check by check (the kinds' own checks first).

    With ``unread`` (a config rebuilt from one that failed its schema, its refused keys standing as
    :class:`_Unread`), a check that fails on reading one says nothing: its verdict would be about a key the user
    did not give as read."""
    problems: list[str] = []
    for check in (_kind_problems, *dict.fromkeys(KIND_CHECKS.values()), *_CHECKS):
        try:
            problems += check(config)
        except Exception:
            if not unread:
                raise
    return problems


def _kind_problems(config: StudyConfig) -> list[str]:
    if config.space.kind not in KIND_CHECKS:
        return [f"space.kind: unknown kind {config.space.kind!r}; known: {', '.join(KIND_CHECKS)}"]
    return _owned_key_problems(config)


def _owned_key_problems(config: StudyConfig) -> list[str]:
    """The space keys given in a study whose kind does not read them (:attr:`Kind.keys`), grouped by the kinds
    that do: ``space.pool / space.repeats: only for space.kind dfs``."""
    owners: dict[str, list[str]] = {}
    for kind, keys in KIND_KEYS.items():
        for key in keys:
            owners.setdefault(key, []).append(kind)
    given: dict[tuple[str, ...], list[str]] = {}
    for key in changed_keys(config.space, *owners):
        if key not in KIND_KEYS[config.space.kind]:
            given.setdefault(tuple(owners[key]), []).append(key)
    return [f"space.{' / space.'.join(keys)}: only for space.kind {' or '.join(kinds)}"
            for kinds, keys in given.items()]


def _setting_problems(config: StudyConfig) -> list[str]:
    problems = []
    if (config.setting is None) == (config.sources is None):
        problems.append("setting / sources: give exactly one (a benchmark setting name, or sources: base + models)")
    if config.setting is not None:
        from evoopt.data.settings import SETTINGS

        if config.setting not in SETTINGS:
            problems.append(f"setting: unknown benchmark setting {config.setting!r}; known: {', '.join(SETTINGS)}")
    return problems


def _reference_problems(config: StudyConfig) -> list[str]:
    """Malformed ``expert:`` references in ``sources``, found before the study is made (or anything trains)."""
    from evoopt.data.settings import expert_problem

    if config.sources is None:
        return []
    problems = []
    for where, reference in config.sources.references():
        if reference.startswith("expert:"):
            if (problem := expert_problem(reference.removeprefix("expert:"))) is not None:
                problems.append(f"{where}: {problem}")
    return problems


def _corpus_problems(config: StudyConfig) -> list[str]:
    """Unknown corpora in ``sources.tasks`` (unless lm-eval scores ``objective.tasks``), or none to score on."""
    from evoopt.data.corpora import CORPORA

    if config.sources is None:
        return []
    problems = []
    if not (config.objective.kind == "lm-eval" and config.objective.tasks):  # else lm-eval's tasks are scored
        problems += [f"sources.tasks[{i}]: unknown corpus {task!r}; known: {', '.join(sorted(CORPORA))}"
                     for i, task in enumerate(config.sources.tasks) if task not in CORPORA]
    if not config.sources.tasks and not config.objective.tasks:
        problems.append("sources.tasks: name the corpora to score on (or objective.tasks for lm-eval)")
    return problems


def _space_problems(config: StudyConfig) -> list[str]:
    problems = []
    for key, (low, high) in config.space.search.items():
        problems += bounds_problems(f"space.search.{key}", low, high)
    problems += log_problems("space", config.space.search, config.space.log)
    return problems + fixed_range_problems("space", config.space.fixed)


def _sampler_problems(config: StudyConfig) -> list[str]:
    import optuna

    from evoopt.search.samplers import SAMPLERS, option_problems

    x0 = config.sampler.options.get("x0")
    problems = [f"sampler.options.x0{key and '.' + key}: must be a finite number, got {value}"
                for key, value in _numbers(x0 if isinstance(x0, dict) else {"": x0}) if not math.isfinite(value)]
    if isinstance(x0, str):  # (a recipe file: read when the space is built, which may first train experts)
        from evoopt.models.io import reference_problem

        if (problem := reference_problem(x0, config.root, where="sampler.options.x0")) is not None:
            problems.append(f"sampler.options.x0: {problem}")
    if not _known(config.sampler.name, optuna.samplers) and config.sampler.name not in SAMPLERS:
        known = sorted([n for n in dir(optuna.samplers) if n.endswith("Sampler") and not n.startswith("Base")
                        and n != "PartialFixedSampler"] + list(SAMPLERS))  # (those a config cannot make)
        problems.append(f"sampler.name: unknown sampler {config.sampler.name!r}; known: {', '.join(known)}")
    return problems + ([] if problems else option_problems(config.sampler))


def _pruner_problems(config: StudyConfig) -> list[str]:
    import optuna

    from evoopt.search.samplers import PRUNERS, make_pruner

    problems = []
    if not _known(config.pruner.name, optuna.pruners) and config.pruner.name not in PRUNERS:
        known = sorted([n for n in dir(optuna.pruners) if n.endswith("Pruner") and n != "BasePruner"] + list(PRUNERS))
        problems.append(f"pruner.name: unknown pruner {config.pruner.name!r}; known: {', '.join(known)}")
    elif isinstance(config.pruner.options, dict):
        try:  # its options, checked with the config (a pruner is cheap to make)
            make_pruner(config.pruner.name, config.pruner.options)
        except ConfigError as error:
            problems.append(str(error))
    if config.pruner.name == "RacingPruner" and not config.objective.fidelities:
        problems.append("pruner.name: RacingPruner tests a trial at objective.fidelities (growing numbers of "
                        "examples per task); give them, e.g. [50, 100, 200]")
    if config.pruner.name == "RacingPruner" and config.objective.metric == "macro_f1":
        problems.append("pruner.name: RacingPruner tests right-or-wrong per example, and macro-F1 is not a mean "
                        "of those; use metric accuracy, or MedianPruner")
    return problems


def _heartbeat_problems(config: StudyConfig) -> list[str]:
    if config.grace_period <= config.heartbeat_interval:  # every running trial would be found dead, and retried
        return [f"grace_period: must be longer than heartbeat_interval ({config.heartbeat_interval} s), got "
                f"{config.grace_period} s; a few heartbeats, e.g. {6 * config.heartbeat_interval}"]
    return []


def _split_problems(config: StudyConfig) -> list[str]:
    if config.objective.split == "test" and not config.objective.allow_test:
        return ["objective.split: 'test' is for reporting, not search; use 'dev' "
                "(or set objective.allow_test: true if you really mean it)"]
    return []


def _fidelity_problems(config: StudyConfig) -> list[str]:
    objective, problems = config.objective, list[str]()
    if not objective.fidelities:
        return problems
    if sorted(set(objective.fidelities)) != objective.fidelities or objective.fidelities[0] <= 0:
        problems.append(f"objective.fidelities: must be increasing positive numbers, got {objective.fidelities}")
    elif objective.fidelities[-1] > (limit := objective.limit or float("inf")):
        problems.append(f"objective.fidelities: {objective.fidelities[-1]} is more than objective.limit ({limit})")
    if objective.kind == "lm-eval" and objective.tasks:
        problems.append("objective.fidelities: lm-eval reports stages on evoopt's own tasks (the setting's "
                        "corpora) only; drop objective.tasks or objective.fidelities")
    if objective.multi_objective:
        problems.append("objective.fidelities: Optuna prunes single-objective studies only")
    if objective.metric == "perplexity":  # (it scores every text in one pass: nothing would be reported)
        problems.append("objective.fidelities: perplexity is scored in one pass, with no stages to prune at; drop "
                        "objective.fidelities")
    return problems


def _lm_eval_task_problems(config: StudyConfig) -> list[str]:
    """lm-eval's own keys given to evoopt's scoring (they were ignored), and an include_path that is no folder."""
    objective = config.objective
    if objective.kind != "lm-eval":
        given = [key for key in ("tasks", "include_path") if getattr(objective, key)]
        return [f"objective.{key}: only for objective.kind lm-eval; set kind: lm-eval, or drop it"
                for key in given]
    if objective.include_path is not None and not (config.root / objective.include_path).is_dir():
        return [f"objective.include_path: {config.root / objective.include_path} is not a folder (of lm-eval task "
                "YAML files); a relative path is read from the study config's folder"]
    return []


def _metric_problems(config: StudyConfig) -> list[str]:
    """A metric its scorer computes: lm-eval tasks (and a causal LM setting's own tasks) are scored by
    accuracy, perplexity by evoopt's own scoring of a causal LM, mse on regression heads (one output)."""
    from evoopt.data.settings import SETTINGS

    objective = config.objective
    setting = SETTINGS.get(config.setting) if config.setting is not None else None
    causal = setting is not None and setting.kind == "causal"
    if objective.kind == "lm-eval" and setting is not None and not causal:
        return [f"objective.kind: lm-eval scores causal language models; {config.setting}'s experts are encoder "
                "classifiers: use kind: dev"]
    if objective.kind == "lm-eval" and objective.metric != "accuracy":
        return [f"objective.metric: lm-eval tasks are scored by accuracy, not {objective.metric}; use metric: "
                "accuracy" + (" (or kind: dev for perplexity)" if objective.metric == "perplexity" else "")]
    if objective.metric == "perplexity" and setting is not None and not causal:
        return ["objective.metric: perplexity needs a causal LM setting"]
    if causal and objective.metric in ("mse", "macro_f1"):
        return [f"objective.metric: {config.setting} is scored by accuracy (its lm-eval tasks) or perplexity, "
                f"not {objective.metric}"]
    if objective.metric == "mse" and setting is not None:
        return [f"objective.metric: mse needs regression heads (one output); {config.setting}'s tasks are "
                "classification: use accuracy or macro_f1"]
    return []


def _estimate_problems(config: StudyConfig) -> list[str]:
    objective, problems = config.objective, list[str]()
    if objective.estimate is None:
        return problems
    if objective.metric == "macro_f1":
        problems.append("objective.estimate: macro-F1 is not a mean over examples; use accuracy")
    elif objective.estimate.method == "irt" and objective.metric in MINIMIZE:
        problems.append(f"objective.estimate.method: irt models right-or-wrong results; use anchor or random "
                        f"with metric {objective.metric}")
    if objective.fidelities:
        problems.append("objective.estimate / objective.fidelities: a trial is scored on the estimator's "
                        "examples; use one or the other")
    if objective.estimate.promote_within is not None and objective.multi_objective:
        problems.append("objective.estimate.promote_within: a promotion compares one score; drop it or "
                        "objective.multi_objective")
    return problems


def _estimate_baseline_problems(config: StudyConfig) -> list[str]:
    if config.objective.estimate is not None and not config.baselines:
        return ["objective.estimate: the estimator is fitted on the baselines' results on dev; "
                "give baselines (at least [sources])"]
    return []


def _task_weight_problems(config: StudyConfig) -> list[str]:
    return [f"objective.weights.{task}: must be a finite number > 0, got {weight}"
            for task, weight in config.objective.weights.items() if not (math.isfinite(weight) and weight > 0)]


BASELINE_NAMES = ("sources", "ensemble", "greedy-soup")  # besides the merge methods' names


def _baseline_problems(baselines: list[str]) -> list[str]:
    """Unknown baselines, named before any is scored (a typo found after an hour of baselines, with the config
    already stored in the study, could not be corrected without a new study name)."""
    from evoopt.merge import available_methods

    known = [*BASELINE_NAMES, *available_methods()]
    return [f"baselines: unknown baseline {name!r}; known: {', '.join(known)}" for name in baselines
            if name not in known]


def method_source_problems(config: StudyConfig, where: str, name: str) -> list[str]:
    """What keeps a merge method from the study's sources (a base they lack; more or fewer models than it takes),
    named before anything is scored: each was found when its recipe was made, after the sources' baselines.
    ``where``: the key naming it (a kind's check passes ``space.method``)."""
    from evoopt.data.settings import SETTINGS
    from evoopt.merge import get_method

    if config.sources is not None:
        has_base, n, fix = config.sources.base is not None, len(config.sources.models), "give sources.base"
    elif config.setting in SETTINGS:
        has_base, n, fix = True, len(SETTINGS[config.setting].tasks), ""
    else:  # (an unknown setting: named by its own check)
        return []
    try:
        method = get_method(name)
    except ValueError:  # (named by its own check)
        return []
    leave = "leave it out of baselines" if where == "baselines" else "choose another method"
    problems = []
    if method.needs_base and not has_base:
        problems.append(f"{where}: {name!r} needs a base (pretrained) model; {fix}, or {leave}")
    if (count := method.count_problem(n)) is not None:
        problems.append(f"{where}: {count}, the study has {n}; {leave}")
    return problems


def _baseline_source_problems(config: StudyConfig) -> list[str]:
    from evoopt.merge import available_methods

    return [problem for name in config.baselines if name in available_methods()
            for problem in method_source_problems(config, "baselines", name)]


def _weight_problems(config: StudyConfig) -> list[str]:
    """objective.weights naming a task that is not scored (it would weigh nothing, silently)."""
    try:
        tasks = config.scored_tasks
    except ConfigError:  # an unknown setting: named by its own check
        return []
    return [f"objective.weights.{task}: not a task of this study; its tasks: {', '.join(tasks)}"
            for task in config.objective.weights if task not in tasks]


def _name_problems(config: StudyConfig) -> list[str]:
    """The name is a folder under the artifacts (its default storage, plots, exports): one that stays there."""
    name = config.name
    parts = name.replace("\\", "/").split("/")
    if not name.strip() or name != name.strip() or name.startswith(("/", "\\")) or ".." in parts or "." in parts:
        return [f"name: {name!r} names a folder under artifacts; give a name without '..', a leading slash, or "
                "spaces at either end"]
    return []


def _storage_problems(config: StudyConfig) -> list[str]:
    """A storage is a URL, not blank (an unset variable ran a private default study)."""
    if config.storage is not None and not config.storage.strip():
        return ["storage: an empty storage URL (an unset variable?); give the URL, or leave storage out for the "
                "default SQLite file in the artifacts folder"]
    return []


_CHECKS: tuple[Check, ...] = (
    _name_problems, _storage_problems, _setting_problems, _reference_problems, _corpus_problems, _space_problems,
    _task_weight_problems,
    lambda config: _baseline_problems(config.baselines), _baseline_source_problems, _weight_problems,
    _sampler_problems, _pruner_problems,
    _split_problems, _heartbeat_problems, _fidelity_problems, _estimate_problems, _estimate_baseline_problems,
    _metric_problems, _lm_eval_task_problems)


class _Unread:
    """Stands, in a config rebuilt after its schema refused some keys, for each refused value, and for every key
    left at its default beside a key the schema did not know (a misspelling of one of them, perhaps): comparing,
    iterating, hashing or reading it fails, so the checks that need it say nothing."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("a key the schema refused")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __iter__ = __len__ = __contains__ = _fail
    __getattr__ = __getitem__ = __hash__ = __repr__ = __str__ = __format__ = __float__ = __int__ = __index__ = _fail  # type: ignore


def _beside_schema(data: dict[str, Any], error: ValidationError) -> list[str]:
    """The other problems of a config its schema refused: the checks of the config rebuilt without the refused
    keys, each check that reads a refused key (or a key left at its default beside an unknown one: a misspelling
    of it, perhaps) left out. A key whose default is None stays None: it reads as absent, which it is. A required
    key refused or missing is given a placeholder that validates, read as refused."""
    import warnings

    try:
        rebuilt = copy.deepcopy(data)
    except Exception:  # (from Python: a value that cannot be copied) the schema's problems alone
        return []
    refused: list[list[Any]] = []
    unknown: list[list[Any]] = []
    for item in error.errors():
        parent: Any = data
        path: list[Any] = []
        for key in item["loc"]:
            if not isinstance(parent, dict) or (key not in parent and item["type"] != "missing"):
                break  # into a list, or a union's member tag (objective.batch_size.constrained-int)
            path.append(key)
            if key not in parent:  # a required key missing: it stands as a placeholder, as a refused one does
                break
            if not isinstance(parent[key], dict):
                break
            parent = parent[key]
        if not path:
            return []
        _walk(rebuilt, path[:-1]).pop(path[-1], None)
        (unknown if item["type"] == "extra_forbidden" else refused).append(path)
    if (config := _rebuilt(rebuilt, refused)) is None:
        return []
    for path in refused:
        _place(config, path)
    for path in unknown:
        holder = _walk(config, path[:-1])
        if isinstance(holder, BaseModel):
            for name, field in type(holder).model_fields.items():
                if name not in holder.model_fields_set and field.get_default(call_default_factory=True) is not None:
                    object.__setattr__(holder, name, _Unread())
    with warnings.catch_warnings():  # pydantic warns when a check dumps an _Unread
        warnings.simplefilter("ignore")
        return _problems(config, unread=True)


_PLACEHOLDERS: tuple[Any, ...] = ("?", ["?", "?"], {})  # a required key refused stands as the first its field takes


def _rebuilt(data: dict[str, Any], refused: list[list[Any]]) -> StudyConfig | None:
    """``data`` (the refused keys left out) validated, a required key among them given a placeholder (read as
    :class:`_Unread` after); None where that is not enough."""
    tried: dict[tuple[Any, ...], int] = {}
    while True:
        try:
            return StudyConfig.model_validate(data)
        except ValidationError as error:
            item = error.errors()[0]  # one at a time: the others may go with it
            path = next((p for p in refused if list(item["loc"][: len(p)]) == p), None)
            if path is None:
                return None  # a problem the schema did not report
            tried[tuple(path)] = attempt = tried.get(tuple(path), -1) + 1
            if attempt == len(_PLACEHOLDERS):
                return None  # no placeholder fits
            _walk(data, path[:-1])[path[-1]] = copy.deepcopy(_PLACEHOLDERS[attempt])


def _walk(config: Any, path: list[Any]) -> Any:
    """What ``path`` reaches in a config: its data (mappings) or its model (fields and mappings)."""
    for key in path:
        config = config.get(key) if isinstance(config, dict) else getattr(config, str(key), None)
    return config


def _place(config: StudyConfig, path: list[Any]) -> None:
    holder = _walk(config, path[:-1])
    if isinstance(holder, dict):
        holder[path[-1]] = _Unread()
    elif isinstance(holder, BaseModel) and path[-1] in type(holder).model_fields:
        object.__setattr__(holder, path[-1], _Unread())


def changed_keys(space: SpaceSpec, *keys: str) -> list[str]:
    """The keys whose values are not their defaults (a stored config spells every default out)."""
    values, defaults = space.model_dump(), SpaceSpec().model_dump()
    return [key for key in keys if values[key] != defaults[key]]


def bounds_problems(key: str, low: float, high: float) -> list[str]:
    """The problem with a [low, high] pair of bounds, if any: not finite, not low < high, or (a merge
    coefficient's, ``...search.density``) reaching out of the coefficient's range, where a sampler may land."""
    from evoopt.merge.recipe import range_problem

    if not (math.isfinite(low) and math.isfinite(high)):
        return [f"{key}: bounds must be finite numbers, got [{low}, {high}]"]
    if not low < high:
        return [f"{key}: bounds must be [low, high] with low < high, got [{low}, {high}]"]
    name = key.rpartition(".")[2]
    return [f"{problem}; narrow the bounds" for value in (low, high)
            if (problem := range_problem(key, name, value)) is not None]


def fixed_range_problems(where: str, fixed: dict[str, Any]) -> list[str]:
    """Fixed coefficients at ``where`` (``space``: ``space.fixed``) that are not finite or out of their range
    (a number, or one per layer group: ``density: {layers.00: 0.5, '*': 0.7}``), or per group without a ``'*'``
    default (the merge refused it at the first tensor no pattern named, after the baselines)."""
    from evoopt.merge.recipe import range_problem

    problems = [f"{where}.fixed.{key}: one value per layer group needs a '*' entry, the value of every tensor no "
                f"other pattern names (patterns given: {', '.join(map(repr, value))})"
                for key, value in fixed.items()
                if isinstance(value, dict) and not any(_matches_all(str(pattern)) for pattern in value)]
    for path, value in _numbers(fixed):
        key = path.partition(".")[0]
        if not math.isfinite(value):
            problems.append(f"{where}.fixed.{path}: must be a finite number, got {value}")
        elif (problem := range_problem(f"{where}.fixed.{path}", key, value)) is not None:
            problems.append(problem)
    return problems


def _matches_all(pattern: str) -> bool:
    """Whether a tensor-group pattern matches every name (``*``, ``?*``, ``**``: wildcards alone)."""
    return bool(pattern) and set(pattern) <= {"*", "?"} and "*" in pattern


def log_problems(where: str, search: dict[str, tuple[float, float]], log: list[str]) -> list[str]:
    """Log-scale coefficients of the space at ``where`` that are not searched, or whose low bound is not > 0."""
    problems, searched = [], ", ".join(search) or "nothing"
    for key in log:
        if key not in search:
            problems.append(f"{where}.log: {key!r} is not searched ({where}.search has {searched})")
        elif search[key][0] <= 0:
            problems.append(f"{where}.search.{key}: a log-scale coefficient needs low > 0, got {search[key][0]}")
    return problems


def fixed_problems(where: str, method: MergeMethod, fixed: dict[str, Any]) -> list[str]:
    """Keys of ``fixed`` (at ``where``) that are none of ``method``'s coefficients."""
    allowed = {*method.per_model, *method.shared}
    return [f"{where}.fixed.{key}: {method.name!r} has no coefficient {key!r}; allowed: "
            f"{', '.join(sorted(allowed)) or 'none'}" for key in fixed if key not in allowed]


def _numbers(values: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """The numbers among ``values`` (and in their per-group mappings), with their key paths."""
    found: list[tuple[str, float]] = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            found += _numbers(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append((path, float(value)))
    return found


def _known(name: str, module: Any) -> bool:
    return isinstance(getattr(module, name, None), type)


def parse_config(data: Any, *, root: Path | None = None, source: str = "study") -> StudyConfig:
    """Validate a study config mapping; every problem is reported at once, with its key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of study keys, got {type(data).__name__}")
    if "models" in data and "method" in data and not {"name", "space"} & set(data):
        raise ConfigError(f"{source}: this is a merge recipe (method, models), not a study config; merge it with "
                          "`evoopt merge RECIPE --out DIR`, or see the README for a study config's keys")
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as error:
        lines = schema_problems(error, "(study)", StudyConfig) + _beside_schema(data, error)
        raise problems(ConfigError, source, lines) from None
    config._root = root or Path.cwd()  # (relative paths are checked against it)
    config._source = source
    lines = _problems(config)
    if lines:
        raise problems(ConfigError, source, lines)
    return config


def load_config(path: str | Path, *, root: Path | None = None) -> StudyConfig:
    """The study config in ``path``; its relative paths are checked against ``root`` (default: its folder)."""
    path = Path(path)
    return parse_config(read_yaml(path, ConfigError, "study config"), root=root or path.resolve().parent,
                        source=str(path))


def same_study(stored: dict[str, Any], config: StudyConfig) -> list[str]:
    """Key paths where a study's stored config identity differs from ``config``'s.

    The stored identity is read through today's schema first, so keys added to the schema
    since (with their defaults) are no difference.
    """
    try:
        stored = StudyConfig.model_validate({"name": config.name, **stored}).identity()
    except ValidationError:
        pass  # a key the schema no longer has: compare as stored, and name it
    return differences(stored, config.identity())


def differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Key paths where two config identities differ."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: stored {json.dumps(a)}, now {json.dumps(b)}")
    return out
