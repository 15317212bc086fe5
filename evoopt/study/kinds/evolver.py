"""The Evolver (Du et al. 2024, "Knowledge Fusion By Evolving Weights of Language Models"): a trial is one
offspring of a population of the experts' weights; ``space.method`` is X of X_Evolver (``none``: plain)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import optuna
import torch

from evoopt.data.outcomes import Outcomes, trial_outcomes
from evoopt.errors import ConfigError, EvaluationError
from evoopt.merge import get_method
from evoopt.merge.merger import Merger
from evoopt.merge.recipe import Recipe
from evoopt.models.io import card_header
from evoopt.search.evolver import EvolverSampler, History, Together
from evoopt.search.population import Population
from evoopt.study.config import StudyConfig, changed_keys, fixed_problems
from evoopt.study.kinds.base import Kind, Progress, Score
from evoopt.study.space import Candidate, EvolverSpace
from evoopt.study.storage import get_trial


class EvolverKind(Kind[EvolverSpace]):
    names = ("evolver",)
    keys: ClassVar[Mapping[str, tuple[str, ...]]] = {"evolver": ("population",)}
    retry_failed = False  # a dead offspring frees its slot and the next trial takes it with the same move
    one_seed = True  # every worker draws the moves of one run (its generators are keyed by generation and target)

    @classmethod
    def calibrated(cls, config: StudyConfig) -> bool:
        """X_Evolver with Fisher or RegMean: X is calibrated on the sources' tasks' training rows."""
        return config.space.method != "none" and get_method(config.space.method).statistic is not None

    @classmethod
    def problems(cls, config: StudyConfig) -> list[str]:
        """The Evolver's space and sampler go together; its X must be a method of the weights alone."""
        space, problems = config.space, []
        if (space.kind == "evolver") != (config.sampler.name == "EvolverSampler"):
            problems.append("space.kind / sampler.name: space.kind evolver and sampler EvolverSampler go together "
                            f"(got {space.kind} and {config.sampler.name})")
        if space.kind not in cls.names:
            return problems
        if space.method != "none":
            try:
                method = get_method(space.method)
            except ValueError as error:
                problems.append(f"space.method: {str(error).removeprefix('method: ')}; or 'none' for the plain Evolver")
            else:
                problems += fixed_problems("space", method, space.fixed)
        elif space.fixed:
            problems.append("space.fixed: the plain Evolver (space.method none) merges nothing; drop it, or name X "
                            "in space.method")
        if changed_keys(space, "search", "log"):
            problems.append("space.search / space.log: the Evolver searches the weights themselves; "
                            "give X's coefficients in space.fixed")
        if config.objective.multi_objective:
            problems.append("objective.multi_objective: the Evolver's greedy selection needs one objective")
        if config.pruner.name != "NopPruner":  # a pruner compares with the study's best trial, not the target
            problems.append(f"pruner.name: the Evolver selects each offspring against its own target, and a pruned "
                            f"offspring counts as rejected; leave out the pruner (got {config.pruner.name}) and stop "
                            "offspring early with sampler.options.selection: paired")
        if config.sampler.options.get("selection") == "paired" and config.objective.estimate is not None:
            problems.append("sampler.options.selection / objective.estimate: the paired rule compares offspring and "
                            "target on the same scored examples; use one or the other")
        problems += answer_rule_problems(config, "the Evolver's")
        if config.sampler.options.get("selection") == "paired" and config.objective.metric == "macro_f1":
            problems.append("sampler.options.selection: the paired rule compares right-or-wrong per example, and "
                            "macro-F1 is not a mean of those; use metric accuracy, or selection greedy")
        return problems

    def make_space(self) -> EvolverSpace:
        return EvolverSpace(self.config, self.sources)

    def title(self) -> str:
        return "evolver " + ("(plain)" if self.config.space.method == "none" else self.config.space.method)

    def history(self, study: optuna.Study) -> History:
        """The population's history, replayed from the study's trials (by the config's own sampler settings,
        so a study opened only to read it needs no EvolverSampler of its own)."""
        if not hasattr(self, "_sampler"):
            from evoopt.search.samplers import base_seed, make_sampler

            sampler = make_sampler(self.config.sampler, base_seed(self.config.sampler, self.config.seed),
                                   lambda: self.space)
            if not isinstance(sampler, EvolverSampler):
                raise ConfigError("sampler.name: space.kind evolver needs EvolverSampler")
            self._sampler = sampler
        return self._sampler.history(study)

    # --- evaluation ---------------------------------------------------------------------------------------

    def build(self, study: optuna.Study | None, device: torch.device,
              progress: Progress | None = None) -> torch.nn.Module:
        self.merger = Merger(self.space.default(), progress=progress)
        self.model, self.tokenizer_folder, self.device = self.merger.model, self.merger.structure.folder, device
        self.population = self._population()
        return self.model

    def _population(self) -> Population:
        from evoopt.study.evaluator import calibration_file

        calibration = calibration_file(self.config, self.sources) if self.calibrated(self.config) else None
        x = self.space.merge_recipe(calibration)
        folder = scratch_folder(self, "population-") if self.config.space.population == "mmap" else None
        return Population(self.merger.sources, list(self.merger.targets), dtype=self.merger.dtype, folder=folder,
                          device=self.device, method=x.merge_method if x else None, base=self.merger.base,
                          coefficients=x.coefficients if x else None, seed=self.config.seed,
                          statistics=self._estimator(x) if calibration and x else None)

    def _estimator(self, recipe: Recipe) -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Fisher or RegMean statistics of an individual: its weights written into the model, calibration run."""
        from evoopt.merge.merger import calibration_batches
        from evoopt.models.statistics import estimate_fisher, gram_matrices

        assert self.merger.structure.folder is not None and self.model is not None
        model = self.model
        batches = [{k: v.to(self.device) for k, v in b.items()}
                   for b in calibration_batches(recipe, self.merger.structure.folder)]
        estimate = estimate_fisher if recipe.merge_method.statistic == "fisher" else gram_matrices
        # what no individual sets (a per-task head, swapped in by the scorer for each task it scores) as the model
        # was built: put back before each estimate, so that an individual's statistics do not depend on the task
        # scored last (X(P) of a resumed run differed from an uninterrupted one's)
        fixed = {name: p.data for name, p in model.named_parameters() if name not in self.merger.targets}

        def statistics(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, tensor in fixed.items():
                    params[name].data = tensor
                for name, tensor in weights.items():
                    self.merger.targets[name].copy_(tensor)
            return estimate(model, batches)

        return statistics

    def candidate(self, trial: optuna.Trial) -> tuple[torch.nn.Module, float]:
        """Bring the population to P_{g-1} and write the trial's offspring (or initial individual) into the model."""
        candidate = self.space.suggest(trial)
        trial.set_user_attr("generation", candidate.generation)
        sampler = trial.study.sampler  # it replayed the history to claim this slot: no second replay
        history = sampler.claimed(trial.number) if isinstance(sampler, EvolverSampler) else None
        history = history or self.history(trial.study)  # (a retried trial keeps its slot without a claim)
        together = self._together(history, candidate)
        if together is not None:  # X_Evolver: the generation's winners together, against the best of them
            trial.set_user_attr("together", list(together.trials))
        if _paired(sampler) and candidate.generation > 0:  # the trial its offspring is compared with
            trial.set_user_attr("target_trial", together.trials[0] if together else history.holders[candidate.target])
        begun = time.perf_counter()
        return self._write(history, candidate), begun

    def rival(self, trial: optuna.Trial) -> tuple[Outcomes, float] | None:
        """``selection: paired``: the offspring against its target, on the examples of the target's trial."""
        sampler = _paired(trial.study.sampler)
        if sampler is None or trial.user_attrs.get("target_trial") is None:
            return None
        holder = int(trial.user_attrs["target_trial"])
        outcomes = trial_outcomes(get_trial(trial.study, holder))
        if outcomes is None:
            raise EvaluationError(f"trial {trial.number}: its target's trial {holder} kept no per-example outcomes; "
                                  "the paired rule needs them")
        return outcomes, sampler.alpha

    def _write(self, history: History, candidate: Candidate) -> torch.nn.Module:
        """Bring the population to P_{g-1} and write the candidate (an offspring, an initial individual, or
        X_Evolver's winners of a generation together)."""
        self.population.advance(history, max(candidate.generation - 1, 0))
        together = self._together(history, candidate)
        self.population.write(self.merger.targets, candidate.move, individual=candidate.target,
                              together=together.moves if together else ())
        assert self.model is not None
        return self.model

    def _together(self, history: History, candidate: Candidate) -> Together | None:
        """X_Evolver's winners of the candidate's generation when it scores them together (target N), else None."""
        if candidate.target != self.space.size:
            return None
        if candidate.generation not in history.together:
            raise ConfigError(f"trial: generation {candidate.generation} has no winners to score together")
        return history.together[candidate.generation]

    def trial_model(self, params: Mapping[str, Any]) -> torch.nn.Module:
        """An Evolver trial's model is evolved weights, rebuilt from the study's history: see :meth:`export`."""
        raise ConfigError("trial: an Evolver trial's model is made of evolved weights, not a recipe; save it with "
                          "`evoopt export STUDY --trial N --out DIR` and use that folder")

    def answer(self, history: History) -> torch.nn.Module:
        """The Evolver's answer (the fittest individual, or X of the population) of the last generation."""
        if history.generation == 0:
            raise ConfigError("trial: the study has not scored its initial population yet")
        self.population.advance(history, history.generation - 1)
        self.population.write_result(self.merger.targets, history)
        assert self.model is not None
        return self.model

    # --- records, export, report ------------------------------------------------------------------------

    def record(self, trial: optuna.trial.FrozenTrial) -> str:
        import yaml

        candidate = self.space.candidate(trial)
        move = vars(candidate.move) if candidate.move else None
        return yaml.safe_dump({"trial": trial.number, "generation": candidate.generation,
                               "target": candidate.target, "move": move}, sort_keys=False)

    def report(self, study: optuna.Study, score: Score) -> None:
        """Score the answer of the last finished generation on dev and test; stored on the study."""
        history = self.history(study)
        reported = study.user_attrs.get("evoopt:result", {}).get("generation")
        if history.generation == 0 or reported == history.generation - 1:
            return  # nothing scored yet, or this generation's answer is reported
        self.built(study)
        model = self.answer(history)
        study.set_user_attr("evoopt:result", {
            "generation": history.generation - 1, "best": history.best, "method": self.config.space.method,
            "dev": score(model, self.config.objective.split), "test": score(model, "test")})

    def best_text(self, study: optuna.Study) -> str:
        """The population: each individual's fitness, the answer and its scores when reported."""
        history = self.history(study)
        if history.generation == 0:
            raise ConfigError(f"trial: study {study.study_name!r} has not scored its initial population yet")
        accepted = sum(len(moves) for moves in history.accepted)
        if self.config.space.method == "none":
            fitness = ", ".join("-" if f is None else f"{f:.4f}" for f in history.fitness)
            lines = [f"# population after generation {history.generation - 1}: fitness (dev) {fitness}; "
                     f"{accepted} offspring accepted; fittest: individual {history.best}"]
        else:
            score = "-" if history.fitness[0] is None else f"{history.fitness[0]:.4f}"
            lines = [f"# population after generation {history.generation - 1}: {self.config.space.method} of it "
                     f"scores (dev) {score}, trial {history.holders[0]}; {accepted} offspring accepted"]
        return "\n".join([*lines, *answer_lines(study, self.config.name)]) + "\n"

    def export(self, study: optuna.Study, which: str | int, out: Path, *,
               overwrite: bool = False) -> tuple[Path, str]:
        """The answer (``best``: the fittest individual or X of the last population) or a trial's candidate,
        with the history that rebuilds it (YAML) in its model card."""
        import yaml

        from evoopt.study.kinds.parameter import export_merged

        self.built(study)
        history = self.history(study)
        if which in ("best", "result"):
            self.answer(history)
            what = f"generation {history.generation - 1}: " + (
                f"individual {history.best}, the fittest" if self.config.space.method == "none"
                else f"{self.config.space.method} of the population")
        else:
            candidate = self.space.candidate(get_trial(study, which))
            self._write(history, candidate)
            if self._together(history, candidate) is not None:
                what = f"trial {which}: generation {candidate.generation}, its winning offspring together"
            else:
                kind = "offspring of individual" if candidate.move else "initial individual"
                what = f"trial {which}: generation {candidate.generation}, {kind} {candidate.target}"
        rebuild: dict[str, Any] = {
            "study": self.config.name, "evolver": what, "seed": self.config.seed, "method": self.config.space.method,
            "experts": list(self.sources.models), "fitness": history.fitness,
            "accepted": {g: [vars(m) for m in moves] for g, moves in enumerate(history.accepted) if moves}}
        text = yaml.safe_dump(rebuild, sort_keys=False)
        card = "\n".join([*card_header(f"{self.config.name}: Evolver", ("evolver",)),
                          f"Evolved with evoopt's Evolver (Du et al. 2024), {what}.", "", "```yaml", text.rstrip(),
                          "```", ""])
        return export_merged(self.merger, self.sources, out, overwrite=overwrite, card=(text, card)), what


def answer_rule_problems(config: StudyConfig, whose: str) -> list[str]:
    """``objective.estimate``'s answer rules (``answer_level``, ``promote_within``) choose the answer among the trials;
    a kind whose answer is its population's (``whose``) refuses them."""
    spec = config.objective.estimate
    given = [] if spec is None else [k for k in ("answer_level", "promote_within") if getattr(spec, k) is not None]
    if not given:
        return []
    return [f"objective.estimate.{' / objective.estimate.'.join(given)}: they choose the answer among the trials; "
            f"{whose} answer is its last population's (scored on the whole dev set when reported): leave them out"]


def answer_lines(study: optuna.Study, name: str) -> list[str]:
    """The reported answer's scores on dev and test, and how to save it (`evoopt best` of the population kinds)."""
    lines = []
    if result := study.user_attrs.get("evoopt:result"):
        for split in ("dev", "test"):
            scores = ", ".join(f"{task} {value:.4f}" for task, value in result[split].items())
            lines.append(f"# answer of generation {result['generation']}, {split}: {scores}")
    return [*lines, f"# save it: evoopt export {name}.yaml --trial best --out DIR"]


def scratch_folder(kind: Kind, prefix: str) -> Path:
    """A temporary folder in the study's artifacts folder, removed with the kind (memory-mapped individuals). Its
    process holds a lock on a file in it while it runs: one a killed process left (N x the model's size on disk)
    is removed by the next process to make one, which takes its lock; never one whose process runs, on this host
    or another sharing the folder (a lock, not a process number: containers repeat those)."""
    import fcntl
    import os
    import shutil
    import tempfile

    kind.config.artifact_dir.mkdir(parents=True, exist_ok=True)
    for left in kind.config.artifact_dir.glob(f"{prefix}*"):
        try:  # (open for writing, never made: NFS locks files open for writing; a folder without one is kept)
            handle = os.open(left / _LOCK, os.O_WRONLY)
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (held by a live process: OSError)
            shutil.rmtree(left, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(handle)
    scratch = tempfile.TemporaryDirectory(prefix=prefix, dir=kind.config.artifact_dir)
    lock = (Path(scratch.name) / f"{_LOCK}.new").open("wb")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (Path(scratch.name) / f"{_LOCK}.new").rename(Path(scratch.name) / _LOCK)  # (found by others once held)
    except OSError:  # (a file system without locks, some FUSE or Lustre mounts: the folder is still removed at
        pass  # exit, only not by another process after a kill)
    kind._scratch = (scratch, lock)  # type: ignore[attr-defined]  # (kept alive as long as the kind)
    return Path(scratch.name)


_LOCK = ".lock"  # a scratch folder's lock file, held by its process


def _paired(sampler: optuna.samplers.BaseSampler) -> EvolverSampler | None:
    """The study's Evolver sampler if it selects by the paired rule (it holds the validated options)."""
    return sampler if isinstance(sampler, EvolverSampler) and sampler.selection == "paired" else None
