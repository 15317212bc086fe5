"""The interface of a search-space kind: what the engine, the CLI, the exporter and the lm-eval plugin call.

A kind turns a study config into a search space, builds the evaluation model once per
process, writes each trial's candidate into it, records and rebuilds trials, exports a
trial or the study's answer, and reports the answer. Nothing above this layer asks which
kind a study has: it calls these methods.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import optuna
import torch

from evoopt.data.objective import combine
from evoopt.data.outcomes import Outcomes, challenge_in_turn, trial_outcomes
from evoopt.merge.recipe import Recipe
from evoopt.models.io import atomic_write
from evoopt.study.config import StudyConfig
from evoopt.study.space import Sources
from evoopt.study.storage import (
    ANSWER_ATTR,
    attach,
    best_index,
    best_trial,
    confirmed_outcomes,
    get_trial,
    record_confirmed_outcomes,
)

Progress = Callable[[str, int, int], None]


class Score(Protocol):
    """How a report scores a model: ``score(model, split)``, its per-task scores on the whole split (float32;
    ``like_trials``: in the precision the study's trials are scored in, for a score that selection compares with
    theirs); ``score.outcomes(split)``, the per-example outcomes of the last model it scored there (None: not
    kept)."""

    def __call__(self, model: torch.nn.Module, split: str, *, like_trials: bool = False) -> dict[str, float]: ...

    def outcomes(self, split: str) -> Outcomes | None: ...


SpaceT = TypeVar("SpaceT")


class Kind(Generic[SpaceT]):
    """One search-space kind (``space.kind``); subclasses are registered in :mod:`evoopt.study.kinds`.

    The evaluation model is built by :meth:`build` (once per process); :meth:`candidate`
    then writes each trial's candidate into it (or returns a model that shares its weights).
    """

    names: ClassVar[tuple[str, ...]]  # the space.kind values it serves
    # space.kind value -> the space keys only it reads (with other kinds that name them): given in another
    # kind's study, they are refused there, with the kinds that read them named
    keys: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    retry_failed: ClassVar[bool] = True  # a trial of a dead worker is retried with the same parameters
    one_seed: ClassVar[bool] = False  # every worker's sampler draws from the study's seed (not seed + worker)
    # its answer is a model of its sources' layers, which a data-flow pool may take (study:NAME.yaml)
    in_pools: ClassVar[bool] = True

    def __init__(self, config: StudyConfig, sources: Sources) -> None:
        self.config, self.sources = config, sources
        self.model: torch.nn.Module | None = None
        self.tokenizer_folder: Path | None = None
        self.device = torch.device("cpu")

    # --- the config and the sampler -------------------------------------------------------------------

    @classmethod
    def problems(cls, config: StudyConfig) -> list[str]:
        """This kind's config problems, with their key paths. It runs on every study's config: a kind
        checks its own keys in its own studies and refuses them in the other kinds' studies."""
        return []

    @classmethod
    def calibrated(cls, config: StudyConfig) -> bool:
        """Whether this kind's models read calibration texts (the training rows of ``sources.tasks``, for Fisher's
        and RegMean's statistics): their rules then make the models (:func:`evoopt.study.storage.check_experts`)."""
        return False

    @functools.cached_property
    def space(self) -> SpaceT:
        """The search space (built once): its ``sampler_options()`` are given to samplers that take them."""
        return self.make_space()

    def make_space(self) -> SpaceT:
        """Build the search space from the config and the sources."""
        raise NotImplementedError

    def start(self, study: optuna.Study) -> None:
        """Prepare a study before its first trial (worker 0, before other workers start): the method search
        enqueues its known-good starts. Default: nothing."""

    def title(self) -> str:
        """The space in a few words, for notes and tables: ``layerwise ties``."""
        return f"{self.config.space.kind} {self.config.space.method}"

    # --- evaluation ---------------------------------------------------------------------------------------

    def build(self, study: optuna.Study | None, device: torch.device,
              progress: Progress | None = None) -> torch.nn.Module:
        """The evaluation model, loaded once; sets ``model``, ``tokenizer_folder`` and ``device``."""
        raise NotImplementedError

    def built(self, study: optuna.Study | None, progress: Progress | None = None) -> torch.nn.Module:
        """The evaluation model, built now if it was not (reports and exports build only when needed; a worker
        given a kind built before goes on with it)."""
        if self.model is None:
            from evoopt.merge.merger import pick_device

            return self.build(study, pick_device(self.config.device), progress)
        return self.model

    def rival(self, trial: optuna.Trial) -> tuple[Outcomes, float] | None:
        """What the trial's candidate must beat on the same examples, with the test level, when the kind selects
        by a paired test (the Evolver's ``selection: paired``); None: the trial is scored plainly."""
        return None

    def candidate(self, trial: optuna.Trial) -> tuple[torch.nn.Module, float]:
        """Sample the trial's parameters, record what they mean (user attributes), and write the candidate
        into the evaluation model; returns the model to score and when the writing began."""
        raise NotImplementedError

    def trial_model(self, params: Mapping[str, Any]) -> torch.nn.Module:
        """A finished trial's model, rebuilt from its parameters (``trial.params``) in the evaluation model."""
        raise NotImplementedError

    # --- records, export, report ------------------------------------------------------------------------

    def record(self, trial: optuna.trial.FrozenTrial) -> str:
        """What a trial is, as YAML: its recipe (parameter spaces) or path (data-flow space)."""
        raise NotImplementedError

    def recipe(self, params: Mapping[str, Any]) -> Recipe | None:
        """A trial's merge recipe, for kinds whose candidates are recipes (else None)."""
        return None

    def model_info(self, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        """What lm-eval records about a trial's model (``evoopt_...`` keys)."""
        import yaml

        return {f"evoopt_{self.config.space.kind}": yaml.safe_load(self.record(trial))}

    def export(self, study: optuna.Study, which: str | int, out: Path, *,
               overwrite: bool = False) -> tuple[Path, str]:
        """Save a trial's model (or, ``best``, the study's answer) as a Hugging Face folder; returns the folder
        and what was saved, in words (``trial 12 (value 0.8632)``)."""
        raise NotImplementedError

    def report(self, study: optuna.Study, score: Score) -> None:
        """Score the study's answer on test for reporting (building the evaluation model only when there is
        something new to report) and store it on the study. The default: the best trial, rebuilt."""
        self._confirm(study, score)
        trial = best_trial(study)
        reports = dict(study.user_attrs.get("evoopt:test", {}))
        if trial is None or str(trial.number) in reports:
            return
        self.built(study)
        model = self.trial_model(trial.params)
        # an estimated trial's dev scores are estimates: the answer is scored on the whole dev split too
        confirmed = study.user_attrs.get(ANSWER_ATTR, {}).get("dev", {}).get(str(trial.number))
        dev = confirmed or (score(model, self.config.objective.split) if "estimated" in trial.user_attrs
                            else trial.user_attrs.get("scores", {}))
        reports[str(trial.number)] = {"test": score(model, "test"), "dev": dev}
        study.set_user_attr("evoopt:test", reports)
        self._upload(study, trial)

    def _confirm(self, study: optuna.Study, score: Score) -> None:
        """``objective.estimate.confirm``: score the best estimated trials on the whole dev set (each once) and
        make the best by that score of every trial confirmed so far the study's answer (``evoopt:answer``; a
        trial confirmed at an earlier report stays a candidate when later estimates pass it), unless a trial
        scored on the whole dev set from the start (a reference trial) is better still. A confirmed trial's
        whole-dev outcomes are kept in the study (:func:`confirmed_outcomes`). With ``answer_level``, a later
        report (or, with promotions, a later promoted trial) changes the answer only by the paired rule of
        :meth:`_challenge`. With ``promote_within`` and
        ``confirm: 0`` nothing is scored here: the answer is the best of the trials scored on the whole dev set
        (promoted during the search, or reference trials)."""
        spec = self.config.objective.estimate
        promoting = spec is not None and spec.promote_within is not None
        if spec is None or not (spec.confirm or promoting) or len(study.directions) > 1:
            return
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        trials = study.get_trials(deepcopy=False)
        values = {t.number: t.value for t in trials
                  if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None}
        estimated = [n for n in values if "estimated" in trials[n].user_attrs]
        ranked = sorted(estimated, key=lambda n: (-values[n] if maximize else values[n], n))
        top = [trials[n] for n in ranked[: spec.confirm]]
        if not top and not promoting:
            return
        stored = study.user_attrs.get(ANSWER_ATTR, {})
        dev = dict(stored.get("dev", {}))
        split = self.config.objective.split
        if any(str(t.number) not in dev for t in top):
            self.built(study)
            for trial in top:
                if str(trial.number) not in dev:
                    # (compared with reference and promoted trials' scores and outcomes: in their precision)
                    dev[str(trial.number)] = score(self.trial_model(trial.params), split, like_trials=True)
                    outcomes = score.outcomes(split)
                    if outcomes is not None:
                        record_confirmed_outcomes(study, trial.number, outcomes)
        whole = {int(n): combine(d, self.config.objective.weights) for n, d in dev.items() if int(n) in values}
        whole.update({n: value for n, value in values.items() if "estimated" not in trials[n].user_attrs})
        if not whole:  # promote_within, before any trial was scored on the whole dev set
            return
        numbers = sorted(whole)
        best = numbers[best_index([whole[n] for n in numbers], maximize=maximize)]
        answer: dict[str, Any] = {"trial": best, "of": [t.number for t in top], "dev": dev}
        if spec.answer_level is not None:
            answer.update(self._challenge(study, trials, stored, whole, best, spec.answer_level, maximize=maximize,
                                              promoting=promoting))
        if answer != stored:
            study.set_user_attr(ANSWER_ATTR, answer)

    def _challenge(self, study: optuna.Study, trials: list[optuna.trial.FrozenTrial], stored: Mapping[str, Any],
                   whole: dict[int, float], best: int, level: float, *, maximize: bool,
                   promoting: bool) -> dict[str, Any]:
        """The paired answer rule (``objective.estimate.answer_level``). The answer of the last report, the
        incumbent, stays unless a trial seen since (newly confirmed, promoted, or a reference trial) is better than
        it by a one-sided paired test at ``level`` on their whole-dev per-example outcomes: the test of the
        Evolver's paired rule (:func:`challenge_in_turn`), as racing (Birattari et al., 2002) keeps an incumbent
        until a paired test decides. Confirmed at the end of a run, the best by whole-dev score of the new trials
        challenges. Promoted (``promote_within``), each new trial challenges in turn, by trial number, as they were
        scored during the search: the answer then moves only by the test at every moment of the run, and the first
        answer is the best reference trial, else the first trial promoted. Without promotions the first report's
        answer is the best whole-dev score. A trial without kept outcomes (confirmed before they were kept) is
        compared by score.

        Returns the answer's fields: ``trial``; ``best``, the best whole-dev score's trial (the rule without the
        test); ``seen``, the trials compared so far; ``decisions``, each test's challenger, incumbent, paired
        difference and p-values."""
        incumbent = stored.get("trial")
        decisions = list(stored.get("decisions", []))
        fields: dict[str, Any] = {"best": best, "seen": sorted(whole), "decisions": decisions}
        new = [n for n in sorted(whole) if n not in set(stored.get("seen", ())) and n != incumbent]
        if incumbent not in whole:  # the first report (or the incumbent is gone)
            if not promoting or not new:
                return {**fields, "trial": best}
            references = [n for n in new if not {"promoted", "estimated"} & trials[n].user_attrs.keys()]
            incumbent = references[best_index([whole[n] for n in references], maximize=maximize)] \
                if references else new[0]
            new = [n for n in new if n != incumbent and n not in references]
        challengers = new if promoting else \
            [new[best_index([whole[n] for n in new], maximize=maximize)]] if new else []
        if not challengers:
            return {**fields, "trial": incumbent}
        outcomes = confirmed_outcomes(study)
        for n in (*challengers, incumbent):
            if n not in outcomes and "estimated" not in trials[n].user_attrs:  # reference or promoted: its own
                found = trial_outcomes(trials[n])
                if found is not None:
                    outcomes[n] = found
        answer, records = challenge_in_turn(incumbent, challengers, outcomes, whole, maximize=maximize, alpha=level,
                                            weights=self.config.objective.weights)
        return {**fields, "trial": answer, "decisions": decisions + records}

    @staticmethod
    def trial_text(trial: optuna.trial.FrozenTrial) -> str:
        """A trial named with its value, for what a command saved."""
        value = f"{trial.values[0]:.6g}" if len(trial.values) == 1 else ", ".join(f"{v:.6g}" for v in trial.values)
        return f"trial {trial.number} (value {value})"

    def best_text(self, study: optuna.Study) -> str:
        """What `evoopt best` prints: the best trial's value, scores and record."""
        trial = get_trial(study, "best")
        value = trial.values[0] if len(trial.values) == 1 else trial.values  # (a list only for several objectives)
        return (f"# trial {trial.number}: value {value}; dev scores {trial.user_attrs.get('scores')}\n"
                + self.record(trial))

    def _upload(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """The trial's record, as an artifact optuna-dashboard shows."""
        file = atomic_write(self.config.artifact_dir / f"best-trial-{trial.number}.yaml", self.record(trial))
        attach(self.config, study, file)
