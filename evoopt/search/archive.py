"""M2N2's archive of weights in one process, and the children it writes into a model.

An :class:`Archive` holds one copy of every merged tensor per member, starting from the experts. It
follows a study's :class:`~evoopt.search.m2n2.ArchiveHistory`: to reach the archive as generation g left
it, it builds that generation's placed children from the archive before it (their parents' angle over
the whole model first, then tensor by tensor) and writes each into its place in turn. A trial's child is
written straight into the evaluation model's tensors, one tensor at a time.

Memory: the archive's members + the evaluation model (+ one generation's children of one tensor), or,
with ``folder``, the members in memory-mapped safetensors files there instead of RAM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from evoopt.models.io import TensorSource
from evoopt.search.m2n2 import ArchiveHistory, Child, crossover, slerp_angle
from evoopt.search.population import memory_mapped


class Archive:
    """The members' copies of the tensors ``names`` (in the parameters' order that a child's split cuts).

    Args:
        sources: the experts, the first members.
        names: the merged tensors (the evaluation model's, less excluded per-task heads).
        dtype: the members' dtype (the evaluation model's).
        folder: keep the members in memory-mapped safetensors files in this folder.
        device: where the members live when not memory-mapped.
        linear: interpolate linearly instead of spherically.
        seeds: more first members after the experts (merges of them), each the tensors ``names``.
    """

    def __init__(self, sources: Sequence[TensorSource], names: Sequence[str], *, dtype: torch.dtype,
                 folder: Path | None = None, device: torch.device | None = None, linear: bool = False,
                 seeds: Sequence[Mapping[str, torch.Tensor]] = ()) -> None:
        self.sources, self.names, self.dtype, self.seeds = list(sources), list(names), dtype, list(seeds)
        self.folder, self.linear = folder, linear
        self.device = torch.device("cpu") if folder is not None or device is None else device
        self.members: list[dict[str, torch.Tensor]] = []
        self.generation = 0
        self.offsets: dict[str, int] = {}
        total = 0
        for name in self.names:
            self.offsets[name] = total
            total += self.sources[0].get(name, check=False).numel()
        self.total = total  # entries in the parameters' order
        self.reset()

    def reset(self) -> None:
        """Back to the experts (and the seed merges)."""
        self.generation = 0
        first = [{n: source.get(n, check=False) for n in self.names} for source in self.sources] + self.seeds
        self.members = [self._member({n: t[n].to(self.device, self.dtype, copy=True).contiguous() for n in self.names},
                                     i) for i, t in enumerate(first)]

    def _member(self, tensors: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        if self.folder is None:
            return tensors
        return memory_mapped(tensors, self.folder / f"member-{index}-{self.generation}.safetensors")

    def split(self, child: Child) -> int:
        """The child's split point as an entry of the parameters' order."""
        return min(int(child.split * self.total), self.total)

    def angle(self, child: Child) -> float:
        """Omega between the child's parents (as whole vectors)."""
        if self.linear:
            return 0.0
        a, b = self.members[child.first], self.members[child.second]
        return slerp_angle([a[n] for n in self.names], [b[n] for n in self.names])

    def child_tensor(self, child: Child, name: str, omega: float) -> torch.Tensor:
        """Tensor ``name`` of the child (:func:`~evoopt.search.m2n2.crossover`), ``omega`` its parents' angle."""
        return crossover(self.members[child.first][name], self.members[child.second][name],
                         offset=self.offsets[name], split=self.split(child), ratio=child.ratio, omega=omega,
                         linear=self.linear)

    def advance(self, history: ArchiveHistory, generation: int) -> None:
        """Hold the archive as ``generation`` left it: place the children of the generations after the current one."""
        if generation >= len(history.placed):
            raise ValueError(f"generation: the history has generations 0..{len(history.placed) - 1} finished, "
                             f"not {generation}")
        if generation < self.generation:  # only a duplicate of an old trial asks for this: rebuild
            self.reset()
        for g in range(self.generation + 1, generation + 1):
            placed = history.placed[g]
            if placed:
                omegas = [self.angle(child) for child, _ in placed]  # all from the archive before g
                joining = sorted({place for _, place in placed if place >= len(self.members)})
                fresh: dict[int, dict[str, torch.Tensor]] = {place: {} for place in joining}
                with torch.no_grad():
                    for name in self.names:
                        built = [self.child_tensor(child, name, omega) for (child, _), omega in zip(placed, omegas)]
                        for (_, place), tensor in zip(placed, built):
                            if place in fresh:
                                fresh[place][name] = tensor
                            else:
                                self.members[place][name].copy_(tensor)
                self.generation = g  # (names the files of members that join)
                for place in joining:
                    self.members.append(self._member(fresh[place], place))
            self.generation = g

    def write(self, targets: Mapping[str, torch.Tensor], child: Child | None = None, *, member: int = 0) -> None:
        """Write a child (or a member as it is) into ``targets``, tensor by tensor."""
        omega = self.angle(child) if child is not None else 0.0
        with torch.no_grad():
            for name in self.names:
                tensor = self.child_tensor(child, name, omega) if child is not None else self.members[member][name]
                targets[name].copy_(tensor.reshape(targets[name].shape))
