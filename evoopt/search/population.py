"""The Evolver's population of weights in one process, and the candidates it writes into a model.

A :class:`Population` holds one copy of every merged tensor per individual, starting from
the experts (``P_0``). It follows a study's :class:`~evoopt.search.evolver.History`: to reach
``P_g`` it applies each generation's accepted offspring, tensor by tensor (all of one
generation's offspring are built from the same ``P_{g-1}``, so the new tensors of one name are
computed before any is written back). A candidate is written straight into the evaluation
model's tensors, one tensor at a time; the offspring is never a flattened copy of the model.

Memory: N individuals + the base (merge-integrated only) + the evaluation model, i.e. at most
(N + 2) x the model's size, plus one tensor's worth of scratch. With ``folder``, the
individuals live in memory-mapped safetensors files there instead of RAM (models for which
N copies do not fit). Fisher_Evolver and RegMean_Evolver also keep each individual's
statistics (Fisher: one more model's size per individual; RegMean: a Gram matrix per linear
layer) and an offspring's whole weights while its statistics are estimated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evoopt.errors import ConfigError
from evoopt.merge import MergeMethod
from evoopt.models.io import TensorSource
from evoopt.search.evolver import History, Move, offspring_tensor

logger = logging.getLogger(__name__)
Estimate = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


class Population:
    """N individuals' copies of the tensors ``names``, at generation ``generation`` (P_g).

    Args:
        sources: the experts, the initial individuals.
        names: the merged tensors (the evaluation model's, less excluded per-task heads), in a fixed
            order: a tensor's crossover mask is seeded by its position in it.
        dtype: the individuals' dtype (the evaluation model's).
        folder: keep the individuals in memory-mapped safetensors files in this folder.
        device: where the individuals live when not memory-mapped (the evaluation model's device).
        method: X of X_Evolver (a candidate is X applied to the population with the offspring in
            its target's place), or None for the plain Evolver.
        base: the base model, for methods that need one.
        coefficients: X's coefficients for one tensor name (a recipe's ``coefficients``).
        seed: X's seed (DARE's masks).
        statistics: for X that needs per-model statistics (Fisher, RegMean): estimates them for an
            individual's weights (the study engine writes them into its model and runs the
            calibration texts through it).
    """

    def __init__(self, sources: Sequence[TensorSource], names: Sequence[str], *, dtype: torch.dtype,
                 folder: Path | None = None, device: torch.device | None = None, method: MergeMethod | None = None,
                 base: TensorSource | None = None, coefficients: Any = None, seed: int = 0,
                 statistics: Estimate | None = None) -> None:
        if method is not None and method.statistic is not None and statistics is None:
            raise ConfigError(f"statistics: {method.name!r} needs per-model data statistics; give the function "
                              "that estimates them for an individual's weights")
        if method is not None and method.needs_base and base is None:
            raise ConfigError(f"method: {method.name!r} needs a base model; give the study's sources a base")
        self.sources, self.names, self.dtype, self.folder = list(sources), list(names), dtype, folder
        self.device = torch.device("cpu") if folder is not None or device is None else device
        self.method, self.coefficients, self.seed = method, coefficients, seed
        self.estimate = statistics if method is not None and method.statistic is not None else None
        self.statistics: list[Mapping[str, torch.Tensor]] = []
        self.base = {n: base.get(n, check=False).to(self.device, dtype) for n in self.names} \
            if method and method.needs_base and base is not None else None
        self.individuals: list[dict[str, torch.Tensor]] = []
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        """Back to P_0, the experts."""
        self.individuals = []
        for i, source in enumerate(self.sources):
            # (a copy: a .bin source's tensors are its own, memory-mapped copy-on-write; evolving them in place
            # changed the experts for the merger and for the next reset)
            tensors = {n: source.get(n, check=False).to(self.device, self.dtype, copy=True).contiguous()
                       for n in self.names}
            if self.folder is not None:
                tensors = memory_mapped(tensors, self.folder / f"individual-{i}.safetensors")
            self.individuals.append(tensors)
        self.generation = 0
        if self.estimate is not None:
            self.statistics = [self.estimate(individual) for individual in self.individuals]

    def tensors(self, name: str) -> list[torch.Tensor]:
        return [individual[name] for individual in self.individuals]

    def advance(self, history: History, generation: int) -> None:
        """Hold P_generation: apply the accepted offspring of the generations after the current one."""
        if generation >= len(history.accepted):
            raise ValueError(f"generation: the history has generations 0..{len(history.accepted) - 1} "
                             f"finished, not {generation}")
        if generation < self.generation:  # only a duplicate of an old trial asks for this: rebuild
            logger.info("population: rebuilding from the experts for generation %d", generation)
            self.reset()
        for g in range(self.generation + 1, generation + 1):
            moves = history.accepted[g]
            if moves:
                with torch.no_grad():
                    for index, name in enumerate(self.names):
                        tensors = self.tensors(name)
                        children = [offspring_tensor(m, tensors, index) for m in moves]  # all from P_{g-1}
                        for move, child in zip(moves, children):
                            self.individuals[move.target][name].copy_(child)
                if self.estimate is not None:
                    for move in moves:
                        self.statistics[move.target] = self.estimate(self.individuals[move.target])
            self.generation = g

    def write(self, targets: Mapping[str, torch.Tensor], move: Move | None = None, *,
              individual: int | None = None, together: Sequence[Move] = ()) -> None:
        """Write a candidate into ``targets`` (the evaluation model's tensors), tensor by tensor.

        Plain Evolver: the offspring of ``move``, or ``individual`` as it is. Merge-integrated: X of
        the population, with the offspring in its target's place when a move is given (or the offspring
        of every move of ``together`` in their targets' places: all built from the current population).
        """
        moves = [move] if move is not None else list(together)
        if self.method is None and len(moves) > 1:
            raise ValueError("together: the plain Evolver's candidate is one individual or one offspring")
        statistics, offspring = self.statistics, {}
        if self.estimate is not None and moves:  # the offspring's own statistics first
            with torch.no_grad():
                offspring = {m.target: {n: offspring_tensor(m, self.tensors(n), i) for i, n in enumerate(self.names)}
                             for m in moves}
            statistics = [self.estimate(offspring[j]) if j in offspring else s for j, s in enumerate(statistics)]
        with torch.no_grad():
            for index, name in enumerate(self.names):
                tensors = self.tensors(name)
                if self.method is None and moves and targets[name].shape == tensors[0].shape \
                        and targets[name].device == tensors[0].device:
                    offspring_tensor(moves[0], tensors, index, out=targets[name])  # straight into the model
                    continue
                children = {m.target: offspring[m.target][name] if offspring else offspring_tensor(m, tensors, index)
                            for m in moves}
                if self.method is None:
                    picked = children[moves[0].target] if moves else \
                        tensors[individual if individual is not None else 0]
                    targets[name].copy_(picked.reshape(targets[name].shape))
                    continue
                tensors = [children.get(j, t) for j, t in enumerate(tensors)]
                base = self.base[name] if self.base is not None else None
                stats = [s[name] for s in statistics] if statistics and all(name in s for s in statistics) else None
                merged = self.method.apply(base, tensors, self.coefficients(name, len(tensors)), seed=self.seed,
                                           name=name, statistics=stats)
                targets[name].copy_(merged.reshape(targets[name].shape))

    def write_result(self, targets: Mapping[str, torch.Tensor], history: History) -> None:
        """The Evolver's answer for P_current: the fittest individual, or X of the population."""
        self.write(targets, individual=history.best if self.method is None else None)


def memory_mapped(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Save ``tensors`` as a safetensors file and return writable views of it, memory-mapped."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    data = np.memmap(path, dtype=np.uint8, mode="r+", offset=8 + length)
    mapped = {}
    for name, tensor in tensors.items():
        start, end = header[name]["data_offsets"]
        mapped[name] = torch.from_numpy(data[start:end]).view(tensor.dtype).view(tensor.shape)
    return mapped
