"""M2N2 (Abrantes, Lange and Tang, "Competition and Attraction Improve Model Fusion", GECCO 2025): an archive
of models seeded with the experts, evolved one child per trial by crossover at an evolved split, parents
chosen by resource competition and attraction (:mod:`evoopt.search.m2n2`). The answer is the archive's
member with the best plain dev score, reported on test after the search."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import optuna
import torch

from evoopt.errors import ConfigError
from evoopt.merge.merger import Merger
from evoopt.merge.recipe import Recipe
from evoopt.models.io import card_header
from evoopt.search.archive import Archive
from evoopt.search.m2n2 import ATTR, ArchiveHistory, Child, M2N2Sampler, child_of
from evoopt.study.config import StudyConfig, changed_keys, method_source_problems
from evoopt.study.kinds.base import Kind, Progress, Score
from evoopt.study.kinds.evolver import answer_lines, answer_rule_problems, scratch_folder
from evoopt.study.kinds.methods import DEFAULT_METHODS
from evoopt.study.space import Sources, fixed_recipe
from evoopt.study.storage import get_trial


@dataclass(frozen=True)
class Offspring:
    """One M2N2 trial: generation 0 scores expert ``member``; a later one a child of the archive."""

    generation: int
    slot: int
    child: Child | None
    member: int = 0


class M2N2Space:
    """``space.kind: m2n2``: :class:`~evoopt.search.m2n2.M2N2Sampler` decides every parameter."""

    def __init__(self, config: StudyConfig, sources: Sources) -> None:
        self.config, self.sources = config, sources
        self.experts = len(sources.models)
        self.members = self.experts + len(config.space.seeds)  # the first archive: experts, then seed merges
        self.size = int(config.sampler.options.get("archive") or self.members)

    def sampler_options(self) -> dict[str, Any]:
        return {"members": self.members, "task_weights": self.config.objective.weights}

    def default(self) -> Recipe:
        """The evaluation model's recipe: a plain average, which needs no preprocessing."""
        return fixed_recipe(self.sources, "linear", {}, [{"weight": 1.0}] * self.experts, config=self.config)

    def seed_recipes(self) -> list[Recipe]:
        """The seed merges' recipes: each method at the method search's known-good coefficients."""
        recipes = []
        for method in self.config.space.seeds:
            spec = DEFAULT_METHODS[method]
            recipes.append(fixed_recipe(self.sources, method, dict(spec.get("fixed", {})),
                                        [dict(spec["start"])] * self.experts, config=self.config))
        return recipes

    def suggest(self, trial: optuna.Trial) -> Offspring:
        """Read the trial's child (the sampler chose it when the first parameter was asked for)."""
        trial.relative_params  # noqa: B018  (the sampler claims the trial's slot when they are first asked for)
        slot = trial.study._storage.get_trial_system_attrs(trial._trial_id).get(ATTR)
        if slot is None:
            raise ConfigError("space.kind m2n2: the trial has no generation; sampler.name must be M2N2Sampler")
        generation, index = int(slot["generation"]), int(slot["slot"])
        if generation == 0:
            return Offspring(0, index, None, trial.suggest_int("member", 0, self.members - 1))
        last = self.size - 1
        params = {"parent_a": trial.suggest_int("parent_a", 0, last),
                  "parent_b": trial.suggest_int("parent_b", 0, last),
                  "split": trial.suggest_float("split", 0.0, 1.0), "ratio": trial.suggest_float("ratio", 0.0, 1.0)}
        return Offspring(generation, index, child_of(params))

    def offspring(self, trial: optuna.trial.FrozenTrial) -> Offspring:
        """A finished trial's child (or expert), from its stored parameters."""
        slot = trial.system_attrs.get(ATTR)
        if slot is None:
            raise ConfigError(f"trial {trial.number} is not an M2N2 trial (it has no {ATTR!r} attribute)")
        generation = int(slot["generation"])
        if generation == 0:
            return Offspring(0, int(slot["slot"]), None, int(trial.params["member"]))
        return Offspring(generation, int(slot["slot"]), child_of(trial.params))


class M2N2Kind(Kind[M2N2Space]):
    names = ("m2n2",)
    keys: ClassVar[Mapping[str, tuple[str, ...]]] = {"m2n2": ("population", "seeds")}
    retry_failed = False  # a dead child frees its slot and the next trial takes it with the same draw
    one_seed = True  # every worker draws the children of one run (keyed by generation and slot)

    @classmethod
    def problems(cls, config: StudyConfig) -> list[str]:
        space, problems = config.space, []
        if (space.kind == "m2n2") != (config.sampler.name == "M2N2Sampler"):
            problems.append("space.kind / sampler.name: space.kind m2n2 and sampler M2N2Sampler go together "
                            f"(got {space.kind} and {config.sampler.name})")
        if space.kind not in cls.names:
            return problems
        if changed := changed_keys(space, "method", "search", "fixed", "log"):
            problems.append(f"space.{' / space.'.join(changed)}: M2N2 evolves the weights themselves by crossover; "
                            "it takes no merge method or coefficients (leave them out)")
        if config.objective.multi_objective:
            problems.append("objective.multi_objective: M2N2's competition needs one objective")
        if unknown := [m for m in space.seeds if m not in DEFAULT_METHODS]:
            problems.append(f"space.seeds: {', '.join(map(repr, unknown))} not among {', '.join(DEFAULT_METHODS)}")
        for seed in dict.fromkeys(space.seeds):
            problems += method_source_problems(config, "space.seeds", seed)
        problems += answer_rule_problems(config, "M2N2's")
        if config.pruner.name != "NopPruner":
            problems.append(f"pruner.name: M2N2's competition compares every member on the same examples, so a "
                            f"child is scored whole; leave out the pruner (got {config.pruner.name})")
        return problems

    def make_space(self) -> M2N2Space:
        return M2N2Space(self.config, self.sources)

    def title(self) -> str:
        return f"m2n2 (archive {self.space.size})"

    def sampler(self) -> M2N2Sampler:
        """The config's own sampler (a study opened only to read its archive needs no M2N2Sampler of its own)."""
        if not hasattr(self, "_sampler"):
            from evoopt.search.samplers import base_seed, make_sampler

            sampler = make_sampler(self.config.sampler, base_seed(self.config.sampler, self.config.seed),
                                   lambda: self.space)
            if not isinstance(sampler, M2N2Sampler):
                raise ConfigError("sampler.name: space.kind m2n2 needs M2N2Sampler")
            self._sampler = sampler
        return self._sampler

    def history(self, study: optuna.Study) -> ArchiveHistory:
        return self.sampler().history(study)

    # --- evaluation ---------------------------------------------------------------------------------------

    def build(self, study: optuna.Study | None, device: torch.device,
              progress: Progress | None = None) -> torch.nn.Module:
        self.merger = Merger(self.space.default(), progress=progress)
        self.model, self.tokenizer_folder, self.device = self.merger.model, self.merger.structure.folder, device
        folder = scratch_folder(self, "archive-") if self.config.space.population == "mmap" else None
        seeds = []
        for recipe in self.space.seed_recipes():  # merged once, kept as the first archive's members
            merged = Merger(recipe, progress=progress)
            merged.merge()
            seeds.append({name: merged.targets[name].detach().clone() for name in self.merger.targets})
            del merged
        self.archive = Archive(self.merger.sources, list(self.merger.targets), dtype=self.merger.dtype,
                               folder=folder, device=device, linear=self.sampler().interpolation == "linear",
                               seeds=seeds)
        return self.model

    def candidate(self, trial: optuna.Trial) -> tuple[torch.nn.Module, float]:
        """Bring the archive to where the previous generation left it and write the trial's child into the model."""
        offspring = self.space.suggest(trial)
        trial.set_user_attr("generation", offspring.generation)
        if offspring.child is None:  # which first member, by name (the dashboard shows it beside `member`)
            experts = self.space.experts
            trial.set_user_attr("first member", f"expert {self.sources.labels[offspring.member]}"
                                if offspring.member < experts else
                                f"{self.config.space.seeds[offspring.member - experts]} merge of the experts")
        sampler = trial.study.sampler  # it replayed the history to claim this slot: no second replay
        history = sampler.claimed(trial.number) if isinstance(sampler, M2N2Sampler) else None
        history = history or self.history(trial.study)
        begun = time.perf_counter()
        self._write(history, offspring)
        assert self.model is not None
        return self.model, begun

    def _write(self, history: ArchiveHistory, offspring: Offspring) -> None:
        self.archive.advance(history, max(offspring.generation - 1, 0))
        self.archive.write(self.merger.targets, offspring.child, member=offspring.member)

    def trial_model(self, params: Any) -> torch.nn.Module:
        raise ConfigError("trial: an M2N2 trial's model is made of evolved weights, not a recipe; save it with "
                          "`evoopt export STUDY --trial N --out DIR` and use that folder")

    def answer(self, history: ArchiveHistory) -> torch.nn.Module:
        """The archive's member with the best plain dev score, as the last finished generation left it."""
        if history.generation == 0:
            raise ConfigError("trial: the study has not scored its experts yet")
        self.archive.advance(history, history.generation - 1)
        self.archive.write(self.merger.targets, member=history.best)
        assert self.model is not None
        return self.model

    # --- records, export, report ------------------------------------------------------------------------

    def record(self, trial: optuna.trial.FrozenTrial) -> str:
        import yaml

        offspring = self.space.offspring(trial)
        what: dict[str, Any] = {"trial": trial.number, "generation": offspring.generation}
        if offspring.child:
            what["child"] = vars(offspring.child)
        elif offspring.member < self.space.experts:
            what["expert"] = offspring.member
        else:
            what["seed merge"] = self.config.space.seeds[offspring.member - self.space.experts]
        return yaml.safe_dump(what, sort_keys=False)

    def report(self, study: optuna.Study, score: Score) -> None:
        """Score the archive's best member (by plain dev score) of the last finished generation on dev and test."""
        history = self.history(study)
        reported = study.user_attrs.get("evoopt:result", {}).get("generation")
        if history.generation == 0 or reported == history.generation - 1:
            return
        self.built(study)
        model = self.answer(history)
        study.set_user_attr("evoopt:result", {
            "name": f"M2N2 result (the archive's best by dev, generation {history.generation - 1})",
            "generation": history.generation - 1, "best": history.best, "trial": history.holders[history.best],
            "dev": score(model, self.config.objective.split), "test": score(model, "test")})

    def best_text(self, study: optuna.Study) -> str:
        """The archive: each member's trial and plain dev score, the answer and its scores when reported."""
        history = self.history(study)
        if history.generation == 0:
            raise ConfigError(f"trial: study {study.study_name!r} has not scored its experts yet")
        members = ", ".join(f"trial {n} ({'-' if v is None else f'{v:.4f}'})"
                            for n, v in zip(history.holders, history.values))
        placed = sum(len(p) for p in history.placed)
        lines = [f"# archive after generation {history.generation - 1}: {members}; {placed} children entered; "
                 f"best: member {history.best} (trial {history.holders[history.best]})"]
        return "\n".join([*lines, *answer_lines(study, self.config.name)]) + "\n"

    def export(self, study: optuna.Study, which: str | int, out: Path, *,
               overwrite: bool = False) -> tuple[Path, str]:
        """The answer (``best``) or a trial's child, with the history that rebuilds it (YAML) in its model card."""
        import yaml

        from evoopt.study.kinds.parameter import export_merged

        self.built(study)
        history = self.history(study)
        if which in ("best", "result"):
            self.answer(history)
            what = (f"generation {history.generation - 1}: member {history.best} "
                    f"(trial {history.holders[history.best]}), the best by dev score")
        else:
            offspring = self.space.offspring(get_trial(study, which))
            self._write(history, offspring)
            what = f"trial {which}: generation {offspring.generation}, " + (
                "a child" if offspring.child else f"first member {offspring.member}")
        rebuild: dict[str, Any] = {
            "study": self.config.name, "m2n2": what, "seed": self.config.seed, "experts": list(self.sources.models),
            "seed merges": list(self.config.space.seeds),
            "interpolation": "linear" if self.archive.linear else "slerp", "archive": history.holders,
            "placed": {g: [{**vars(c), "place": p} for c, p in placed]
                       for g, placed in enumerate(history.placed) if placed}}
        text = yaml.safe_dump(rebuild, sort_keys=False)
        card = "\n".join([*card_header(f"{self.config.name}: M2N2", ("m2n2",)),
                          f"Evolved with evoopt's M2N2 (Abrantes et al. 2025), {what}.", "", "```yaml",
                          text.rstrip(), "```", ""])
        return export_merged(self.merger, self.sources, out, overwrite=overwrite, card=(text, card)), what
