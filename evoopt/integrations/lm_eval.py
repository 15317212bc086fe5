"""lm-evaluation-harness model ``evoopt``: a merge recipe, or a study's trial, merged in memory.

lm-eval 0.4 has no plugin discovery: importing this module registers the model::

    import lm_eval
    import evoopt.integrations.lm_eval  # noqa: F401  (registers model="evoopt")

    lm_eval.simple_evaluate(model="evoopt", model_args="recipe=recipe.yaml", tasks=["hellaswag"], batch_size=8)

From the shell, ``python -m evoopt.integrations.lm_eval`` is lm-eval's own CLI with the model available::

    python -m evoopt.integrations.lm_eval --model evoopt --model_args recipe=recipe.yaml --tasks hellaswag
    python -m evoopt.integrations.lm_eval --model evoopt --tasks hellaswag \\
        --model_args study=NAME,storage=sqlite:///out/studies/NAME/evoopt.db,trial=best

model_args, with exactly one of ``recipe``, ``study`` and ``config``:

- ``recipe=PATH``: a merge recipe YAML, as for ``evoopt merge``.
- ``study=NAME,storage=URL[,trial=best|N]``: a trial of an evoopt study (default: the best); the
  config stored with the study decodes the trial's parameters to a recipe.
- ``config=STUDY.yaml[,trial=best|N]``: the same, the study found through its config file (and
  its storage, unless ``storage=`` is given).
- a data-flow study (``space.kind: dfs``) through ``study=`` or ``config=``: the trial's path
  through the pool's models, built in memory (no weight copied). An exported data-flow model
  is an ordinary folder for lm-eval's ``hf`` model with ``trust_remote_code=True``.
- ``tokenizer=PATH``: default the tokenizer in the merged model's base folder.
- ``device``, ``dtype``: where and in which dtype to merge and score (default: the recipe's; lm-eval's command
  line always passes its ``--device``, default cuda:0, which a ``device`` in the model arguments overrides).
- the HFLM arguments that apply to a loaded model: ``batch_size``, ``max_length``, ``add_bos_token``... (a
  ``batch_size`` in the model arguments overrides ``--batch_size``).

The model is merged once, in memory; nothing is written to disk. Results record the recipe
(``config.evoopt_recipe``) and where it came from (``config.evoopt_source``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.huggingface import HFLM

import evoopt.data.experts  # noqa: F401  (registers the expert: references a recipe may use)
from evoopt.errors import EvooptError
from evoopt.merge.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)
NAME = "evoopt"
_MODULE = "evoopt.integrations.lm_eval"
# HFLM arguments about loading a model from disk: they mean nothing for a model merged in memory
_LOADING = frozenset({"pretrained", "revision", "subfolder", "parallelize", "max_memory_per_gpu", "max_cpu_memory",
                      "offload_folder", "tp_plan", "peft", "delta", "autogptq", "gptqmodel", "gguf_file"})
_USAGE = ("model_args: name the model to merge: recipe=RECIPE.yaml, study=NAME,storage=URL[,trial=best|N] "
          "or config=STUDY.yaml[,trial=best|N]")


class ModelArgsError(ValueError):
    """The ``evoopt`` model's arguments are wrong; the message names the argument and the fix."""


class EvooptLM(HFLM):
    """HFLM over a model merged in memory from ``recipe=``, or from a trial of ``study=`` / ``config=``."""

    def __init__(self, recipe: str | None = None, study: str | None = None, storage: str | None = None,
                 trial: str | int | None = None, config: str | None = None, tokenizer: Any = None,
                 device: str | None = None, dtype: str | None = None, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - _passthrough())
        if unknown:
            fix = ("the model comes from recipe=, study= or config=" if "pretrained" in unknown
                   else "evoopt takes recipe, study, storage, trial, config, tokenizer, device, dtype and "
                        f"these HFLM arguments: {', '.join(sorted(_passthrough()))}")
            raise ModelArgsError(f"model_args: {', '.join(unknown)} not understood by the evoopt model; {fix}")
        chosen = _study_trial(study, storage, trial, config) if recipe is None and (study is None) != (
            config is None) else None  # (anything else: resolve_recipe names the problem)
        built: Recipe | None = None
        if chosen is not None:  # a study's trial, built by its kind (a merge, or a data-flow path)
            if selected := list(chosen[0].objective.tasks):
                logger.warning("the study chose its trials on a seeded half of %s (objective.tasks): scored on "
                               "every document, those tasks include the ones that chose the trial; `evoopt lm-eval "
                               "... --split test` scores their test half alone", ", ".join(selected))
            model, folder, source, info, built = _trial_model(*chosen, device, dtype)
            loaded = _load_tokenizer(tokenizer, folder, model)
        else:
            built, source = resolve_recipe(recipe=recipe, study=study, storage=storage, trial=trial, config=config)
            built, target = _placed(built, device, dtype)
            from evoopt.merge.merger import Merger

            merger = Merger(built)
            _check_lm(merger.model, source)
            loaded = _load_tokenizer(tokenizer, merger.structure.folder, merger.model)
            model = merger.merge()
            if target is not None:
                torch.nn.Module.to(model, target)  # (PreTrainedModel.to is wrapped; mypy misreads it)
            del merger  # task vectors and sources: only the merged model is needed from here on
            info = {"evoopt_recipe": built.model_dump(mode="json", exclude_defaults=True)}
        hf_logger = logging.getLogger("lm_eval.models.huggingface")
        quiet = _Drop("`pretrained` model kwarg is not of type")  # yes: the model is in memory on purpose
        hf_logger.addFilter(quiet)
        try:
            super().__init__(pretrained=model, tokenizer=loaded, **kwargs)
        finally:
            hf_logger.removeFilter(quiet)
        self.recipe = built  # the merge recipe, or None (a data-flow path, evolved weights)
        self.info = info  # what lm-eval records: evoopt_recipe, or the kind's own record (evoopt_path, ...)
        self.source = source

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> EvooptLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None,
                            ) -> EvooptLM:
        """The model arguments, and lm-eval's command-line settings (``batch_size``, ``max_batch_size``, ``device``)
        that they do not name: given both, lm-eval's own passed the key twice (a TypeError)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model: the recipe instead of a Hub revision."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "evoopt_source": self.source,
            **self.info,
        }


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@functools.lru_cache(maxsize=1)
def _passthrough() -> frozenset[str]:
    """HFLM's own arguments that apply to a model given in memory."""
    names = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs", "tokenizer", "device", "dtype"}
    return frozenset(names - _LOADING)


def resolve_recipe(*, recipe: str | None = None, study: str | None = None, storage: str | None = None,
                   trial: str | int | None = None, config: str | None = None) -> tuple[Recipe, str]:
    """The recipe that the model_args name, and a line saying where it came from."""
    given = [key for key, value in (("recipe", recipe), ("study", study), ("config", config)) if value is not None]
    if not given:
        raise ModelArgsError(_USAGE)
    if len(given) > 1:
        raise ModelArgsError(f"model_args: {' and '.join(given)} both name a model; give exactly one. {_USAGE}")
    if recipe is not None:
        for key, value in (("storage", storage), ("trial", trial)):
            if value is not None:
                raise ModelArgsError(f"model_args: {key}= belongs to study= or config=; remove it with recipe=")
        path = Path(str(recipe))
        if not path.is_file():
            raise ModelArgsError(f"recipe={recipe}: no such file; give the path of a merge recipe YAML "
                                 "(as for `evoopt merge`)")
        return load_recipe(path), f"recipe {path}"
    return _trial_recipe(study, storage, trial, config)


def _trial_recipe(study: str | None, storage: str | None, trial: str | int | None,
                  config: str | None) -> tuple[Recipe, str]:
    return _recipe_of(*_study_trial(study, storage, trial, config))


def _recipe_of(loaded: Any, found: Any, frozen: Any, url: str) -> tuple[Recipe, str]:
    """A study trial's recipe, and where it came from."""
    from evoopt.study.config import shown_url
    from evoopt.study.kinds import make_kind

    recipe = make_kind(loaded).recipe(frozen.params)
    if recipe is None:
        raise ModelArgsError(f"study {loaded.name!r}: a {loaded.space.kind} trial is not a recipe; give study= or "
                             "config= to the evoopt model (it builds the trial), or export the trial and use "
                             "--model hf")
    return recipe, f"study {loaded.name!r} trial {frozen.number} ({shown_url(url)})"


def _trial_model(loaded: Any, found: Any, frozen: Any, url: str, device: str | None,
                 dtype: Any) -> tuple[Any, Path | None, str, dict[str, Any], Recipe | None]:
    """A study trial's model, built by the study's kind: (model, tokenizer folder, source line, what lm-eval
    records about it, its recipe if it has one)."""
    from evoopt.study.config import shown_url
    from evoopt.study.kinds import make_kind

    updates, target = _placement(device, dtype)
    kind = make_kind(loaded.model_copy(update=updates))  # (model_copy keeps the config's root)
    kind.built(found)
    model = kind.trial_model(frozen.params)
    source = f"study {loaded.name!r} trial {frozen.number} ({shown_url(url)})"
    _check_lm(model, source)
    if target is not None:
        torch.nn.Module.to(model, target)
    return model, kind.tokenizer_folder, source, kind.model_info(frozen), kind.recipe(frozen.params)


def _check_lm(model: Any, source: str) -> None:
    if not model.can_generate():
        raise ModelArgsError(f"{source}: the merged model is a {type(model).__name__}, not a language model; "
                             "lm-eval scores causal (or seq2seq) LMs")


def _study_trial(study: str | None, storage: str | None, trial: str | int | None,
                 config: str | None) -> tuple[Any, Any, Any, str]:
    """(config, study, trial, storage URL) that study= or config= (with trial=) name."""
    from evoopt.study.config import ConfigError, StudyConfig, load_config, parse_config, same_study, shown_url
    from evoopt.study.run import CONFIG_ATTR, ROOT_ATTR, check_experts, check_source_weights, get_trial

    which = _which(trial)
    loaded: StudyConfig | None = None
    if config is not None:
        path = Path(str(config))
        if not path.is_file():
            raise ModelArgsError(f"config={config}: no such file; give the study config YAML the study was run from")
        loaded = load_config(path)
        name, url = loaded.name, str(storage) if storage is not None else loaded.storage_url
    else:
        if storage is None:
            raise ModelArgsError(f"study={study}: give storage=URL too, the study's Optuna storage "
                                 f"(by default sqlite:///out/studies/{study}/evoopt.db)")
        name, url = str(study), str(storage)
    found = _load_study(name, url)
    stored = found.user_attrs.get(CONFIG_ATTR)
    if not isinstance(stored, dict):
        raise ModelArgsError(f"study={name}: the study in {shown_url(url)} was not made by evoopt (it has no "
                             f"{CONFIG_ATTR!r} attribute); give recipe= for a fixed merge")
    if loaded is None:
        root = Path(found.user_attrs.get(ROOT_ATTR) or Path.cwd())
        loaded = parse_config(stored, root=root, source=f"study {name!r} (its stored config)")
    elif changed := same_study(stored, loaded):
        raise ModelArgsError(f"config={config}: study {name!r} in {shown_url(url)} was made from another config; "
                             "restore the old values or give study=NAME,storage=URL:\n  - " + "\n  - ".join(changed))
    try:
        check_experts(found, loaded.model_copy(update={"storage": url}))
        check_source_weights(found, loaded.model_copy(update={"storage": url}), record=False)
    except ConfigError as error:
        given = f"config={config}" if config is not None else f"study={name}"
        raise ModelArgsError(f"{given}: {str(error).removeprefix('name: ')}") from None
    return loaded, found, get_trial(found, which), url


def _which(trial: str | int | None) -> str | int:
    if trial is None or trial == "best":
        return "best"
    if isinstance(trial, int) and not isinstance(trial, bool) and trial >= 0:
        return trial
    if isinstance(trial, str) and trial.isdigit():
        return int(trial)
    raise ModelArgsError(f"trial={trial}: expected 'best' or a trial number (0, 1, ...)")


def _load_study(name: str, url: str) -> Any:
    import optuna

    from evoopt.study.config import ConfigError, shown_url
    from evoopt.study.run import storage_from_url

    try:
        storage = storage_from_url(url, create=False)
    except ConfigError as error:
        raise ModelArgsError(f"storage={shown_url(url)}: {str(error).removeprefix('storage: ')}") from None
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise ModelArgsError(f"study={name}: no such study in {shown_url(url)}; it has: "
                             f"{', '.join(names) or 'none'}") from None


def _placed(recipe: Recipe, device: str | None, dtype: Any) -> tuple[Recipe, torch.device | None]:
    """The recipe merging on ``device`` in ``dtype`` (when given), and the device to move the model to."""
    updates, target = _placement(device, dtype)
    if not updates:
        return recipe, None
    return recipe.model_copy(update=updates).with_root(recipe.root), target


def _placement(device: str | None, dtype: Any) -> tuple[dict[str, str], torch.device | None]:
    """``device`` and ``dtype`` checked: the recipe or study-config keys they set, and the device to use. For
    ``cuda:N`` it makes N the current CUDA device: recipes and study configs say ``cuda``, so the merge runs on N
    too (the one side effect, before anything is merged)."""
    updates: dict[str, str] = {}
    if dtype is not None and str(dtype) != "auto":
        name = str(dtype).removeprefix("torch.")
        if name not in ("float32", "float16", "bfloat16"):
            raise ModelArgsError(f"dtype={dtype}: expected auto, float32, bfloat16 or float16")
        updates["dtype"] = name
    target = None
    if device is not None and str(device) != "auto":
        try:
            target = torch.device(str(device))
        except RuntimeError:
            raise ModelArgsError(f"device={device}: not a device; use auto, cpu, cuda or cuda:N") from None
        if target.type == "cuda" and not torch.cuda.is_available():
            logger.info("device=%s: no CUDA device is visible; merging and scoring on the CPU", device)
            target = torch.device("cpu")
        if target.type == "cuda" and target.index is not None:  # cuda:N: merge there too (recipes say cuda)
            if target.index >= (count := torch.cuda.device_count()):
                raise ModelArgsError(f"device={device}: this machine has {count} CUDA device(s); use cuda:0 to "
                                     f"cuda:{count - 1}, or auto")
            torch.cuda.set_device(target)
        updates["device"] = "cuda" if target.type == "cuda" else "cpu"
    return updates, target


def _load_tokenizer(tokenizer: Any, folder: Path | None, model: PreTrainedModel) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        loaded = tokenizer
    else:
        where = tokenizer if tokenizer is not None else folder
        if where is None:
            raise ModelArgsError("tokenizer=: the merged model's base is not a folder, so there is no tokenizer "
                                 "next to it; give tokenizer=PATH (a folder with the sources' tokenizer)")
        try:
            loaded = AutoTokenizer.from_pretrained(str(where))
        except (OSError, ValueError, TypeError) as error:
            raise ModelArgsError(f"tokenizer: cannot load one from {where} ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0]}); give tokenizer=PATH, a folder with the "
                                 "sources' tokenizer files") from None
    if loaded.pad_token is None:
        loaded.pad_token = loaded.eos_token
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if rows is not None and len(loaded) > rows:
        raise ModelArgsError(f"tokenizer: it has {len(loaded)} tokens but the model embeds only {rows}; "
                             "give tokenizer=PATH of the sources' own tokenizer")
    return loaded


def register() -> None:
    """Make ``model="evoopt"`` known to lm-eval; safe to call again, and after reloading this module."""
    current = dict(model_registry.items()).get(NAME)
    if current is EvooptLM:
        return
    earlier = isinstance(current, type) and (current.__module__, current.__qualname__) == (_MODULE, "EvooptLM")
    if earlier:  # an earlier copy of this class (importlib.reload): point the name at this one
        model_registry._objs[NAME] = EvooptLM  # the registry has no public way to replace an entry
    elif current is None or current == f"{_MODULE}:EvooptLM":
        register_model(NAME)(EvooptLM)
    else:
        raise ValueError(f"lm-eval model name {NAME!r} is already taken by {current}")


def split_samples(args: list[str]) -> list[str]:
    """evoopt's ``--split dev|test`` among lm-eval's arguments, made lm-eval's ``--samples``: of the ``--tasks`` that
    the study of ``--model_args config=STUDY.yaml`` searched on (``objective.tasks``), that part of their documents,
    as the study split them (:func:`~evoopt.data.objective.registered_docs`: the test part was never seen by its
    selection); other tasks whole. Without ``--split``, the arguments as they are. (``--name=value`` is read as
    ``--name value``, as lm-eval's argparse reads it.)"""
    if not any(a == "--split" or a.startswith("--split=") for a in args):
        return args
    args = [part for a in args for part in (a.split("=", 1) if a.startswith("--") and "=" in a else [a])]
    at = args.index("--split")
    split = args[at + 1] if at + 1 < len(args) else None
    rest = args[:at] + args[at + 2:]
    if split not in ("dev", "test"):
        raise ModelArgsError(f"--split: dev or test, got {split!r}")
    if {"--samples", "-E", "--limit", "-L"} & set(rest):
        raise ModelArgsError("--split: it chooses the documents; leave out --samples and --limit")
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    from evoopt.data.objective import registered_docs
    from evoopt.study.config import load_config
    from evoopt.study.space import study_sources

    def value(*names: str) -> str | None:
        found = [i for i, a in enumerate(rest) if a in names]
        return rest[found[0] + 1] if found and found[0] + 1 < len(rest) else None

    model_args = simple_parse_args_string(value("--model_args", "-a") or "")
    if "config" not in model_args:
        raise ModelArgsError("--split: needs --model_args config=STUDY.yaml[,trial=...], the study that split its "
                             "tasks into dev and test")
    config = load_config(Path(str(model_args["config"])))
    tasks = [t for t in (value("--tasks", "-t") or "").split(",") if t]
    searched = [t for t in tasks if t in config.objective.tasks]
    if not searched:
        raise ModelArgsError(f"--split: none of --tasks ({', '.join(tasks) or 'none'}) is among the study's "
                             f"objective.tasks ({', '.join(config.objective.tasks) or 'none'}); the others were never "
                             "split: leave out --split")
    paths = [str(config.root / config.objective.include_path)] if config.objective.include_path else None
    manager = TaskManager(include_path=paths, include_defaults=False)  # (lm-eval's own index takes ~30 s)
    if not set(searched) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    samples = registered_docs(searched, manager, split=split, seed=study_sources(config).data_seed)
    return [*rest, "--samples", json.dumps(samples)]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the ``evoopt`` model: ``python -m evoopt.integrations.lm_eval --model evoopt ...``."""
    from lm_eval.__main__ import cli_evaluate

    module = importlib.import_module(_MODULE)  # registers the model, also when this file runs as __main__
    saved = list(sys.argv)
    try:
        args = module.split_samples(list(saved[1:] if argv is None else argv))
    except (module.ModelArgsError, EvooptError) as error:
        print(f"evoopt lm-eval: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [saved[0] if saved else "lm-eval", *args]
    try:
        cli_evaluate()  # reads sys.argv
    except (module.ModelArgsError, EvooptError) as error:  # (model args, a recipe, a source, a missing package...;
        # the registered model's class: run as __main__, this file's own ModelArgsError is another class)
        print(f"evoopt lm-eval: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as error:
        if not str(error).startswith("Tasks not found"):  # lm-eval's message for unknown --tasks; others are bugs
            raise
        print(f"evoopt lm-eval: error: --tasks: {error}; list them with `lm-eval ls tasks` (with --include_path DIR "
              "for a folder of task YAML files)", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
else:
    register()
