"""Parameter-space merging: a merge method's coefficients, one per model (``global``) or per model and
layer group (``layerwise``, Akiba et al. 2024), written into the evaluation model by a Merger."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import optuna
import torch

from evoopt.merge import get_method
from evoopt.merge.merger import Merger
from evoopt.merge.recipe import Recipe
from evoopt.models.io import open_source, resolve_path
from evoopt.study.config import StudyConfig, fixed_problems, method_source_problems
from evoopt.study.kinds.base import Kind, Progress
from evoopt.study.space import Sources, Space, fixed_recipe, layer_units
from evoopt.study.storage import get_trial


class ParameterKind(Kind[Space]):
    names = ("global", "layerwise")
    keys: ClassVar[Mapping[str, tuple[str, ...]]] = {"layerwise": ("layers_per_group", "split_blocks")}

    @classmethod
    def problems(cls, config: StudyConfig) -> list[str]:
        if config.space.kind not in cls.names:
            return []
        space = config.space
        try:
            method = get_method(space.method)
        except ValueError as error:
            return [f"space.method: {str(error).removeprefix('method: ')}"]
        allowed = set(method.per_model)
        allowed_text = ", ".join(sorted(allowed)) or "none"
        problems = [f"space.search.{key}: {method.name!r} has no per-model coefficient {key!r}; "
                     f"allowed: {allowed_text}" for key in space.search if key not in allowed]
        problems += method_source_problems(config, "space.method", space.method)
        return problems + fixed_problems("space", method, space.fixed)

    def make_space(self, names: list[str] | None = None) -> Space:
        """One value per model and coefficient (global), or per model, coefficient and layer group of
        ``names`` (layerwise; default: the base model's floating-point tensors)."""
        if self.config.space.kind == "global":
            return Space(self.config, self.sources)
        structure = self.sources.base or self.sources.models[0]
        if names is None:
            source = open_source(resolve_path(structure, self.sources.root))
            names = [n for n in source.keys() if source.dtype(n).is_floating_point]
        probe = fixed_recipe(self.sources, self.config.space.method, config=self.config)
        units = layer_units([n for n in names if not probe.excluded(n)], per_group=self.config.space.layers_per_group,
                            split=self.config.space.split_blocks, model=structure)
        return Space(self.config, self.sources, units)

    def build(self, study: optuna.Study | None, device: torch.device,
              progress: Progress | None = None) -> torch.nn.Module:
        self.merger = Merger(self.space.default(), progress=progress)
        self.model, self.tokenizer_folder, self.device = self.merger.model, self.merger.structure.folder, device
        return self.model

    def merged(self, recipe: Recipe) -> torch.nn.Module:
        """Any recipe over the sources (a baseline's, a trial's), written into the evaluation model."""
        return self.merger.merge(recipe)

    def candidate(self, trial: optuna.Trial) -> tuple[torch.nn.Module, float]:
        recipe = self.space.suggest(trial)
        trial.set_user_attr("recipe", recipe.model_dump(mode="json", exclude_defaults=True))
        begun = time.perf_counter()  # the merge alone: sampling and storage writes are not in it
        return self.merged(recipe), begun

    def trial_model(self, params: Mapping[str, Any]) -> torch.nn.Module:
        return self.merged(self.recipe(params))

    def recipe(self, params: Mapping[str, Any]) -> Recipe:
        return self.space.recipe(dict(params))

    def model_info(self, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {"evoopt_recipe": self.recipe(trial.params).model_dump(mode="json", exclude_defaults=True)}

    def record(self, trial: optuna.trial.FrozenTrial) -> str:
        return self.recipe(trial.params).to_yaml()

    def export(self, study: optuna.Study, which: str | int, out: Path, *,
               overwrite: bool = False) -> tuple[Path, str]:
        trial = get_trial(study, which)
        merger = Merger(self.recipe(trial.params))
        merger.merge()
        return export_merged(merger, self.sources, out, overwrite=overwrite), self.trial_text(trial)


def export_merged(merger: Merger, sources: Sources, out: Path, *, overwrite: bool = False,
                  card: tuple[str, str] | None = None) -> Path:
    """A merged model in the Hugging Face layout; per-task heads: one folder per task, each with its head."""
    from evoopt.models.io import atomic_folder
    from evoopt.study.evaluator import task_heads

    if not sources.per_task_heads:
        return merger.export(out, overwrite=overwrite, card=card)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        params = dict(merger.model.named_parameters())
        for task, head in task_heads(sources, torch.device("cpu")).items():
            for name, tensor in head.items():
                params[name].data = tensor
            merger.model.config.num_labels = next(t.shape[0] for t in head.values())
            merger.export(tmp / task, card=card)
    return out
