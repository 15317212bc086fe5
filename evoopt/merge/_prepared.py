"""Fast repeated merges of one parameter: preprocess once, merge many candidates.

A study merges the same sources thousands of times with other coefficients. What
does not depend on the coefficients is computed once per tensor
(:class:`PreparedTensor`): the float32 task vectors, stacked, and a grid of their
sorted magnitudes for trimming. Each candidate is then a single fused pass over
memory (a numba kernel on CPU) that writes the merged tensor straight into the
evaluation model's parameter.

Stored-dtype state (``keep_dtype``): where the base and every source store a tensor in
one 16-bit dtype (bfloat16, float16), the state keeps the sources themselves in that
dtype instead of float32 task vectors, half the memory; each candidate then widens them
to float32 chunk by chunk (:data:`CHUNK` entries) and subtracts the base there, which
is exactly how the task vectors were computed, so the bytes do not change. A bfloat16
model is written by the kernel itself, each float32 result rounded to nearest even as
torch rounds it (no float32 copy of the tensor, no second pass).

Streamed state (:meth:`PreparedTensor.streamed`): where even that does not fit the memory
budget, the state is memory-mapped views of the base and the sources' files (the page
cache's, not the process's memory) and only the small magnitude grid is kept; each
candidate reads them chunk by chunk, widened and subtracted as above: the same bytes again.

On the GPU (or any device but the CPU) the same pass runs as plain torch operations
(:func:`_merge_torch`), with the state on that device when it fits, else copied there
chunk by chunk from (pinned) host memory.

The fused pass computes exactly the formula of
:func:`evoopt.merge.generalized_task_arithmetic`, in the same float32 operation
order, with the same counter-based random stream, so both give the same bytes.
For up to :data:`UNROLLED` sources it reads every source's entry in one loop (the
sources' parameters are tuples, so numba compiles it per number of sources and LLVM
unrolls them), above that a loop per source. DELLA's drop is one of its modes
(:func:`della_merge`). One documented approximation: for tensors of more than
16,384 entries (:data:`GRID_SIZE`) the rank cut of trimming and breadcrumbs is
rounded to a grid of that many ranks (the kept fraction is off by less than
1/16,384); smaller tensors are exact.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from evoopt.merge._numba import _prefer_wide_vectors, _stream_intrinsics
from evoopt.merge._pieces import (
    _GOLDEN32,
    Cut,
    MagnitudeRanks,
    Sparsification,
    rank_window,
    stream_bits,
    stream_key,
)

GRID_SIZE = 16_384
CHUNK = 1 << 18  # entries widened to float32 at a time in the stored-dtype state (1 MiB per model)
STORED = (torch.bfloat16, torch.float16)  # dtypes kept as they are stored
TORCH_CHUNK = 1 << 22  # entries merged at a time by the torch path (the GPU's), a few float32 scratch tensors each
# sources up to which the fused kernel unrolls its loops over them (measured on an AVX-512 Xeon: 8 and 10 sources
# unrolled in every state and method, 12 not; see _for_kernel)
UNROLLED = 8
# numba's SSA pass finds variables of DELLA's loop in the kernel (inlined three levels deep) "not in scope" and then
# handles them: a NumbaIRAssumptionWarning per variable when the kernel compiles, naming this module's locals only
# (the bytes are the torch formula's: tested). Matched by message, so that numba is not imported here.
warnings.filterwarnings("ignore", message=".*_compile__locals_.*not in scope")
_MODES = {"none": 0, "magnitude": 1, "breadcrumbs": 4, "random": 2}  # (3: DELLA's)


@dataclass(frozen=True)
class PreparedTensor:
    """The coefficient-independent part of merging one parameter.

    Attributes:
        name: the parameter's name (keys the random stream).
        base: the base tensor, flat: float32, or its stored 16-bit dtype (``stored``).
        deltas: task vectors, float32, shape (models, numel); ``stored``: the sources themselves, flat,
            in the base's 16-bit dtype (their task vectors are computed per chunk, in float32);
            ``streamed``: a tuple of the sources' flat memory-mapped views (any dtype).
        grid_stride: the entries sorted by (|delta|, index) are kept at ranks 0, s, 2s, ... and n - 1.
        grid_values: |delta| at those ranks, shape (models, grid points), or None when no magnitude
            sparsification is needed.
        grid_indices: the entries' flat indices at those ranks (uint64, same shape), so that a rank cut
            among tied magnitudes keeps exactly its count (:func:`evoopt.merge._pieces.window_bounds`).
    """

    name: str
    base: torch.Tensor
    deltas: torch.Tensor | tuple[torch.Tensor, ...]
    grid_stride: int
    grid_values: np.ndarray | None
    grid_indices: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        name: str,
        base: torch.Tensor,
        tensors: Sequence[torch.Tensor],
        *,
        magnitudes: bool,
        out: torch.Tensor | None = None,
        scratch: np.ndarray | None = None,
        keep_dtype: bool = False,
        sort_on: torch.device | None = None,
    ) -> PreparedTensor:
        """Preprocess one parameter.

        ``out``, if given, is a (models, numel) view to hold the task vectors (float32; the state's
        dtype when stored), so that a caller can keep all of a model's state in one allocation;
        ``scratch``, a float32 buffer of at least numel entries, is reused for sorting.
        ``keep_dtype``: keep the sources in their dtype where they and the base share one of ``STORED``.
        ``sort_on``: a device to sort the magnitudes on for the grid (the GPU path's: :func:`_ranked`).
        """
        if keep_dtype and stored_dtype(base, tensors) is not None:
            return cls._build_stored(name, base, tensors, magnitudes=magnitudes, out=out, scratch=scratch,
                                     sort_on=sort_on)
        if base.dtype != torch.float32 and base.dtype.is_floating_point:
            base32 = base.to(torch.float32)
        else:
            base32 = base
        flat_base = base32.reshape(-1).contiguous()
        shape = (len(tensors), flat_base.numel())
        deltas = torch.empty(shape, dtype=torch.float32) if out is None else out
        if tuple(deltas.shape) != shape or deltas.dtype != torch.float32:
            raise ValueError(f"out: need a float32 tensor of shape {shape}, got {tuple(deltas.shape)} {deltas.dtype}")
        for m, t in enumerate(tensors):
            torch.sub(t.reshape(-1).to(torch.float32), flat_base, out=deltas[m])
        return cls(name, flat_base, deltas, _stride(flat_base.numel()), *_grid(deltas, scratch, magnitudes, sort_on))

    @classmethod
    def _build_stored(cls, name: str, base: torch.Tensor, tensors: Sequence[torch.Tensor], *, magnitudes: bool,
                      out: torch.Tensor | None, scratch: np.ndarray | None,
                      sort_on: torch.device | None = None) -> PreparedTensor:
        flat_base = base.reshape(-1).contiguous()
        shape = (len(tensors), flat_base.numel())
        sources = torch.empty(shape, dtype=base.dtype) if out is None else out
        if tuple(sources.shape) != shape or sources.dtype != base.dtype:
            raise ValueError(f"out: need a {base.dtype} tensor of shape {shape}, got {tuple(sources.shape)} "
                             f"{sources.dtype}")
        for m, t in enumerate(tensors):
            sources[m].copy_(t.reshape(-1))
        return cls(name, flat_base, sources, _stride(shape[1]),
                   *_grid_of_sources(flat_base, list(sources), scratch, magnitudes, sort_on))

    @classmethod
    def streamed(cls, name: str, base: torch.Tensor, sources: Sequence[torch.Tensor], *, magnitudes: bool,
                 scratch: np.ndarray | None = None, sort_on: torch.device | None = None) -> PreparedTensor:
        """The state of a streamed merge: ``base`` and ``sources`` are flat views (memory-mapped files) kept as
        they are; only the magnitude grid is computed (one tensor's float32 task vector at a time)."""
        flat_base, flat = base.reshape(-1), tuple(t.reshape(-1) for t in sources)
        return cls(name, flat_base, flat, _stride(flat_base.numel()),
                   *_grid_of_sources(flat_base, flat, scratch, magnitudes, sort_on))

    def to(self, device: torch.device) -> PreparedTensor:
        """The state on ``device`` (the GPU path keeps it there when it fits); streamed views stay mapped."""
        deltas = self.deltas if isinstance(self.deltas, tuple) else self.deltas.to(device)
        return replace(self, base=self.base.to(device), deltas=deltas)

    @property
    def numel(self) -> int:
        return self.base.numel()

    @property
    def models(self) -> int:
        return len(self.deltas)

    @property
    def streamed_state(self) -> bool:
        """The state is views of the sources' files (chunk by chunk merges)."""
        return isinstance(self.deltas, tuple)

    @property
    def stored(self) -> bool:
        """The state holds the sources in their 16-bit dtype (task vectors computed per chunk)."""
        return self.base.dtype in STORED and not self.streamed_state

    def bounds(self, model: int, window: tuple[int, int]) -> tuple[Cut, Cut]:
        """:func:`~evoopt.merge._pieces.window_bounds` of a rank window, with its ranks rounded to the grid."""
        if self.grid_values is None or self.grid_indices is None:
            raise ValueError(f"{self.name}: prepared without magnitudes; build with magnitudes=True")
        lo, hi = window
        if hi <= lo:
            return (math.inf, 0), (math.inf, 0)
        values, indices = self.grid_values[model], self.grid_indices[model]
        low = self._grid_index(lo, values.size - 1)
        high = None if hi >= self.numel else self._grid_index(hi, values.size - 1)
        return (float(values[low]), int(indices[low])), \
            (math.inf, 0) if high is None else (float(values[high]), int(indices[high]))

    def _grid_index(self, rank: int, last: int) -> int:
        """The grid point nearest to ``rank``: ranks 0, s, 2s, ... and, last, n - 1 (appended where n - 1 is not a
        multiple of s; rounding ``rank / s`` alone sent rank n - 1 to the point before it, and TIES lost each model's
        largest entry)."""
        index = min(round(rank / self.grid_stride), last)
        if index >= last - 1 and rank - (last - 1) * self.grid_stride > self.numel - 1 - rank:
            index = last
        return index


def stored_dtype(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.dtype | None:
    """The 16-bit dtype the base and every source share, if one of ``STORED`` (else None)."""
    return base.dtype if base.dtype in STORED and all(t.dtype == base.dtype for t in tensors) else None


def _stride(n: int) -> int:
    """The grid keeps the sorted magnitudes at ranks 0, s, 2s, ... and n - 1."""
    return max(1, math.ceil(n / GRID_SIZE))


Writer = Callable[[int, int, np.ndarray], None]  # writes |task vector| of entries start..stop into a float32 array


def _ranked(rows: Sequence[Writer], n: int, scratch: np.ndarray | None,
            sort_on: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The magnitude grid of each row: ``rows[m](start, stop, out)`` writes that row's |task vector| (float32) of
    entries start..stop into ``out``. The magnitudes are sorted in ``scratch`` and read at the grid's ranks; each
    grid point's entry in the order of (magnitude, index) is then the (rank - first rank of its value)-th entry of
    that value in index order, found in one more pass (:func:`_occurrences`): the sort of the magnitudes alone, on
    few distinct values (a bfloat16 model's task vectors), took a fifth of a sort of (magnitude, index) keys.
    ``sort_on`` (the GPU path's device): each row is sorted there instead, by a stable sort, whose order is (magnitude,
    index) itself (the same grid: tested on CPU tensors); on one CPU core the sorts took most of a 1.5B model's
    setup (200 s on Zen 4). Returns the grid's magnitudes and indices."""
    if n > 1 << 32:
        raise ValueError(f"a tensor of {n} entries: the magnitude grid indexes at most 2^32")
    ranks = np.unique(np.append(np.arange(0, n, _stride(n)), n - 1))
    values = np.empty((len(rows), ranks.size), dtype=np.float32)
    indices = np.empty((len(rows), ranks.size), dtype=np.uint64)
    work = np.empty(n, dtype=np.float32) if scratch is None or scratch.size < n else scratch[:n]
    part = np.empty(min(CHUNK, n), dtype=np.float32)
    for m, write in enumerate(rows):
        for start in range(0, n, CHUNK):
            write(start, min(n, start + CHUNK), work[start : start + CHUNK])
        if sort_on is not None:
            device, ordered, order = sort_on, None, None
            try:
                ordered, order = torch.from_numpy(work).to(device).sort(stable=True)
                at = torch.from_numpy(ranks).to(device)
                values[m], indices[m] = ordered[at].cpu().numpy(), order[at].cpu().numpy().astype(np.uint64)
                continue
            except torch.cuda.OutOfMemoryError:  # (about 20 bytes an entry beside the evaluation model: a large
                sort_on = None  # embedding on a small GPU) the CPU's sort, for this row and the rest
            finally:
                ordered = order = None  # (freed, then not left cached: the state's placement reads the free memory)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        work.sort()
        picked = work[ranks]
        values[m] = picked
        # per distinct grid value, the occurrences asked (ascending: the ranks are): rank - its value's first rank
        distinct, group = np.unique(picked, return_inverse=True)
        wanted = (ranks - np.searchsorted(work, picked, side="left")).astype(np.int64)
        starts = np.searchsorted(group, np.arange(distinct.size + 1)).astype(np.int64)
        buckets = _buckets(distinct)
        counts, found = np.zeros(distinct.size, dtype=np.int64), np.empty(ranks.size, dtype=np.int64)
        pointers = starts[:-1].copy()
        for start in range(0, n, CHUNK):  # the magnitudes again, in index order
            chunk = part[: min(CHUNK, n - start)]
            write(start, start + chunk.size, chunk)
            _occurrences()(chunk, chunk.view(np.uint32), start, distinct, buckets, starts, wanted, counts, pointers,
                           found)
        indices[m] = found
    return values, indices


def _buckets(distinct: np.ndarray) -> np.ndarray:
    """Where the sorted non-negative float32 ``distinct`` values of each bucket start (a bucket: the top 16 bits, sign,
    exponent and 7 bits of mantissa), and one entry past the last bucket: bucket b's values are
    ``distinct[buckets[b]:buckets[b + 1]]``."""
    top = (distinct.view(np.uint32) >> np.uint32(16)).astype(np.int64)
    return np.searchsorted(top, np.arange((1 << 16) + 1, dtype=np.int64), side="left").astype(np.int64)


_OCCURRENCES: Any = None


def _occurrences() -> Any:
    """Compile (once per process, cached on disk by numba) the pass of :func:`_ranked` that finds, in index order,
    the entries the grid asks for: ``occurrences(chunk, bits, offset, distinct, buckets, starts, wanted, counts,
    pointers, found)``, for each entry of ``chunk`` (entries offset.. of the tensor; ``bits``: their float32 bits)
    whose value is ``distinct[g]`` (found by its bucket, then a binary search), its occurrence number ``counts[g]``
    answers the grid points ``starts[g]..starts[g + 1]`` whose ``wanted`` occurrence it is (``found``: its index)."""
    global _OCCURRENCES
    if _OCCURRENCES is None:
        _prefer_wide_vectors()  # (before numba compiles anything: one target per process)
        import numba

        @numba.njit(cache=True, nogil=True)
        def occurrences(chunk, bits, offset, distinct, buckets, starts, wanted, counts, pointers, found):  # type: ignore[no-untyped-def]
            for j in range(chunk.size):
                bucket = bits[j] >> 16
                lo, hi = buckets[bucket], buckets[bucket + 1]
                if lo == hi:
                    continue
                value, end = chunk[j], hi
                while lo < hi:
                    middle = (lo + hi) >> 1
                    if distinct[middle] < value:
                        lo = middle + 1
                    else:
                        hi = middle
                if lo == end or distinct[lo] != value:
                    continue
                seen, point = counts[lo], pointers[lo]
                while point < starts[lo + 1] and wanted[point] == seen:
                    found[point] = offset + j
                    point += 1
                pointers[lo], counts[lo] = point, seen + 1

        _OCCURRENCES = occurrences
    return _OCCURRENCES


def _grid(deltas: torch.Tensor, scratch: np.ndarray | None, magnitudes: bool,
          sort_on: torch.device | None = None) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """The grid of float32 task vectors, shape (models, n) (None, None without ``magnitudes``)."""
    if not magnitudes:
        return None, None
    def writer(row: np.ndarray) -> Writer:
        def write(start: int, stop: int, out: np.ndarray) -> None:
            np.abs(row[start:stop], out=out)

        return write

    return _ranked([writer(d.numpy()) for d in deltas], deltas.shape[1], scratch, sort_on)


def _grid_of_sources(base: torch.Tensor, sources: Sequence[torch.Tensor], scratch: np.ndarray | None,
                     magnitudes: bool, sort_on: torch.device | None = None,
                     ) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """The grid of flat sources in any dtype (16-bit, memory-mapped): each |task vector| is written chunk by chunk,
    widened to float32 and subtracted as ``build`` does, so no tensor-sized temporary but the sorting buffer."""
    if not magnitudes:
        return None, None
    wide = torch.empty(min(CHUNK, base.numel()))

    def writer(source: torch.Tensor) -> Writer:
        def write(start: int, stop: int, out: np.ndarray) -> None:
            part = torch.from_numpy(out)
            part.copy_(source[start:stop]).sub_(wide[: stop - start].copy_(base[start:stop]))
            part.abs_()

        return write

    return _ranked([writer(t) for t in sources], base.numel(), scratch, sort_on)


def merge_prepared(
    prepared: PreparedTensor,
    out: torch.Tensor,
    *,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    sparsification: Sparsification = "none",
    consensus: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    seed: int = 0,
) -> None:
    """Write ``generalized_task_arithmetic`` of the prepared tensor into ``out``.

    ``out`` must have ``prepared.numel`` entries. On CPU the fused numba kernel writes
    into it (through a float32 buffer when ``out`` is 16-bit); on another device (the GPU),
    or where ``out`` is not contiguous, the same pass in torch operations: the same bytes.
    """
    models = prepared.models
    densities = list(densities) if densities is not None else [1.0] * models
    gammas = list(gammas) if gammas is not None else [0.0] * models
    if len(weights) != models or len(densities) != models or len(gammas) != models:
        raise ValueError(f"weights/densities/gammas: need {models} values each")
    if out.numel() != prepared.numel:
        raise ValueError(f"out: has {out.numel()} entries, tensor {prepared.name!r} has {prepared.numel}")
    params = _kernel_params(prepared, weights, densities, gammas, sparsification, seed)
    settings = (_MODES[sparsification], consensus, normalize, np.float32(scale))
    if out.device.type != "cpu" or not out.is_contiguous():
        _merge_torch(prepared, out, params, settings)
        return
    # What the kernel reads as it is: float32, and bfloat16 as its bits (widened in the kernel); a streamed
    # state as a tuple of the files' flat views, all of one dtype.
    base = _readable(prepared.base)
    if isinstance(prepared.deltas, tuple):
        views = tuple(_readable(d) for d in prepared.deltas)
        deltas: Any = views if views[0] is not None and len({d.dtype for d in prepared.deltas}) == 1 else None
    else:
        deltas = _readable(prepared.deltas)
    if base is None or deltas is None:  # float16, or streamed sources of mixed dtypes
        _merge_stored(prepared, out, params, settings)
        return
    _into(out.view(-1), _fused_kernel(), (base, deltas, None, *_for_kernel(params), *settings, 0))


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's bits as uint16 (numpy has no bfloat16): the float32 value is the bits << 16."""
    return tensor.view(torch.int16).numpy().view(np.uint16)


def _readable(tensor: torch.Tensor) -> np.ndarray | None:
    """A tensor as the kernel reads it: float32 as is, bfloat16 as its bits; None for other dtypes."""
    if tensor.dtype == torch.float32:
        return tensor.numpy()
    return _bits(tensor) if tensor.dtype == torch.bfloat16 else None


def _into(flat: torch.Tensor, kernel: Any, args: tuple[Any, ...]) -> None:
    """Run ``kernel(target, *args, threads)`` into a flat CPU tensor: float32 and bfloat16 (its bits, rounded in
    the kernel as torch rounds) directly, any other dtype through a float32 buffer, cast by torch. ``threads``:
    numba's, at most torch's, among which the kernel splits the tensor's blocks (asked here: numba cannot cache a
    kernel that asks itself). A process given fewer torch threads than cores shares the machine: numba's pool on
    every core, where another process holds one, waits on it (measured: a SmolLM2-135M TIES candidate in 2.2 s
    on two numba threads beside a busy core, 0.23 s on one)."""
    import numba

    numbas = numba.get_num_threads()
    threads = min(numbas, torch.get_num_threads())
    numba.set_num_threads(threads)  # (a prange over fewer workers still wakes the whole pool)
    try:
        target = _readable(flat)
        if target is not None:
            kernel(target, *args, threads)
            return
        buffer = torch.empty(flat.numel())
        kernel(buffer.numpy(), *args, threads)
        flat.copy_(buffer)
    finally:
        numba.set_num_threads(numbas)


def _merge_stored(prepared: PreparedTensor, out: torch.Tensor, params: tuple[np.ndarray, ...],
                  settings: tuple[Any, ...]) -> None:
    """The fused pass over a float16 state (or streamed sources of mixed dtypes), CHUNK entries at a time: widen
    the sources and the base to float32, subtract (the task vectors, exactly as ``build`` computes them), merge
    into float32 and write. (float32 and bfloat16 sources, in memory or streamed, are read by the kernel itself,
    widened where each entry is used.)"""
    models, n = prepared.models, prepared.numel
    size = min(CHUNK, n)
    deltas, base = torch.empty(models * size), torch.empty(size)
    flat = out.view(-1)
    kernel, kernel_params = _fused_kernel(), _for_kernel(params)
    for start in range(0, n, size):
        k = min(size, n - start)
        chunk_base = base[:k].copy_(prepared.base[start : start + k])
        chunk = deltas[: models * k].view(models, k)
        for m in range(models):
            chunk[m].copy_(prepared.deltas[m][start : start + k]).sub_(chunk_base)
        _into(flat[start : start + k], kernel, (chunk_base.numpy(), chunk.numpy(), None, *kernel_params, *settings,
                                                start))


def _kernel_params(
    prepared: PreparedTensor,
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    sparsification: Sparsification,
    seed: int,
) -> tuple[np.ndarray, ...]:
    models = len(weights)
    coefs = np.empty(models, dtype=np.float32)
    lows = np.full(models, -np.inf, dtype=np.float32)
    highs = np.full(models, np.inf, dtype=np.float32)
    # random mode: keep if draw * 2^24 < threshold, the draws of stream keys[m]; magnitude mode: the indices where
    # the ties at the low bound start being kept (thresholds) and at the high bound stop (keys): see window_bounds
    thresholds = np.full(models, 1 << 24, dtype=np.uint64)
    keys = np.zeros(models, dtype=np.uint64)
    for m in range(models):
        coefs[m] = weights[m]
        if sparsification == "none" or densities[m] >= 1.0:
            continue
        if sparsification == "random":
            coefs[m] = weights[m] / densities[m] if densities[m] > 0.0 else 0.0  # (density 0: nothing kept)
            thresholds[m] = math.ceil(float(np.float32(densities[m])) * (1 << 24))
            keys[m] = stream_key(seed, prepared.name, m)
        else:
            gamma = gammas[m] if sparsification == "breadcrumbs" else 0.0
            (lows[m], thresholds[m]), (highs[m], keys[m]) = prepared.bounds(
                m, rank_window(prepared.numel, densities[m], gamma=gamma))
    weight_arr = np.asarray(weights, dtype=np.float32)
    return coefs, weight_arr, lows, highs, thresholds, keys


def _for_kernel(params: tuple[np.ndarray, ...]) -> tuple[Any, ...]:
    """The fused kernel's parameters: for up to UNROLLED sources as tuples, so that the kernel is compiled once per
    number of sources and LLVM unrolls its loops over them (one pass over the entries for all sources, the sums in
    registers); for more, the arrays (a pass per source: LLVM leaves a longer loop rolled, which then keeps the pass
    over the entries from vectorising: measured 12 sources, 16 x slower)."""
    if len(params[0]) > UNROLLED:
        return params
    return tuple(tuple(values) for values in params)


def della_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], epsilons: Sequence[float], keys: Sequence[int],
                ranks: Sequence[MagnitudeRanks], *, consensus: bool, normalize: bool, scale: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`evoopt.merge.della` for CPU tensors in the fused kernel's pass (its DELLA mode; the torch formula
    makes a dozen passes, two of them int64 hashes). The same float32 operations in the same order: Drop (kept
    where the draw of stream ``keys[m]`` is below p = (d - eps) + 2 eps spread, as w tau / p), Elect, Fuse, so the
    same bytes (tested). Float32 and bfloat16 sources are read as they are (bfloat16 widened where each entry is
    used, exactly), other dtypes widened first; the result is in the base's dtype where that is float32 or
    bfloat16 (rounded as torch rounds), else float32. ``ranks``: each model's
    :class:`~evoopt.merge._pieces.MagnitudeRanks` (the kernel divides each rank by the span in float32, as
    ``MagnitudeRanks.spread`` does). ``out``: the tensor to write into (the model's own), used when it is
    contiguous, on the CPU, of the result's dtype and of the base's number of entries."""
    flat = [t.contiguous().view(-1) for t in (base, *tensors)]
    readable = [_readable(t) for t in flat]
    if any(r is None for r in readable) or len({t.dtype for t in flat[1:]}) > 1:
        readable = [t.to(torch.float32).numpy() for t in flat]
    drops = [d < 1.0 for d in densities]
    coefs = np.array(weights, dtype=np.float32)  # (DELLA's coefficient is the weight; p rescales the kept)
    params = (coefs, coefs,
              np.array([d - e if drop else 1.0 for d, e, drop in zip(densities, epsilons, drops)], dtype=np.float32),
              np.array([2 * e if drop else 0.0 for e, drop in zip(epsilons, drops)], dtype=np.float32),
              np.zeros(len(tensors), dtype=np.uint64), np.array(keys, dtype=np.uint64))
    rows = [r.ranks.contiguous().view(-1).numpy() for r in ranks]
    rows = [r.view(np.uint16) for r in rows] if rows[0].dtype == np.int16 else rows
    # The ranks, then the span (one shape: one span) as one more array of their dtype (numba's parallel loops take
    # a tuple of arrays, not one nested in another tuple)
    spreads = (*rows, np.array([ranks[0].span], dtype=rows[0].dtype))
    dtype = base.dtype if base.dtype in (torch.float32, torch.bfloat16) else torch.float32
    if out is None or not (out.is_contiguous() and out.device.type == "cpu" and out.dtype == dtype
                           and out.numel() == base.numel()):
        out = torch.empty(base.shape, dtype=dtype)
    _into(out.view(-1), _fused_kernel(), (readable[0], tuple(readable[1:]), spreads, *_for_kernel(params), 3,
                                          consensus, normalize, np.float32(scale), 0))
    return out


def _merge_torch(prepared: PreparedTensor, out: torch.Tensor, params: tuple[np.ndarray, ...],
                 settings: tuple[Any, ...]) -> None:
    """The fused pass in plain torch operations, for ``out`` on any device (the GPU path: no numba),
    :data:`TORCH_CHUNK` entries at a time: the kernel's float32 operations in the kernel's order, so the same
    bytes. The state is read where it is: on ``out``'s device, or copied there chunk by chunk (pinned or mapped
    host memory)."""
    coefs, weights, lows, highs, thresholds, keys = params
    mode, consensus, normalize, scale = settings
    device, n, models = out.device, prepared.numel, prepared.models
    direct = prepared.stored or prepared.streamed_state  # the sources themselves, not task vectors
    weight_sum = np.float32(0.0)
    for w in weights:  # in model order, in float32, as the kernel sums them
        weight_sum = np.float32(weight_sum + w)
    if abs(weight_sum) < np.float32(1e-8):
        weight_sum = np.float32(1.0)

    def scalar(value: Any) -> float:  # a float32 value as a Python number: applied in float32 to float32 tensors,
        return float(np.float32(value))  # the same bytes, with no copy to the device (each one synchronises a GPU)

    coef_t, weight_t = [scalar(c) for c in coefs], [scalar(w) for w in weights]
    scale_t = scalar(scale)
    # (the plain mean's divisor on the device, made once and only where it divides: CUDA divides by a host scalar as
    # a product with its reciprocal, a bit off the kernel)
    # (torch.full: a fill on the device, queued; torch.tensor copied from the host and waited for it, every tensor)
    weight_sum_t = torch.full((), scalar(weight_sum), dtype=torch.float32, device=device) \
        if normalize and not consensus else scalar(weight_sum)
    chunk = TORCH_CHUNK
    in_place = out.is_contiguous()
    target = out.view(-1) if in_place else torch.empty(n, dtype=out.dtype, device=device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        base = prepared.base[start:stop].to(device, non_blocking=True).to(torch.float32)
        index: torch.Tensor | None = None  # (magnitude mode: the entries' indices, for ties at the cuts)
        total = torch.zeros(stop - start, device=device)
        contributions = []
        for m in range(models):
            d = prepared.deltas[m][start:stop].to(device, non_blocking=True)
            d = d.to(torch.float32) - base if direct else d
            c = d * coef_t[m]
            if mode in (1, 4):
                index = torch.arange(start, stop, device=device) if index is None else index
                a, low, high = d.abs(), float(lows[m]), float(highs[m])
                inside = (a > low) | ((a == low) & (index >= int(thresholds[m])))
                if mode == 4:  # (breadcrumbs: below the high cut too)
                    inside = inside & ((a < high) | ((a == high) & (index < int(keys[m]))))
                c = torch.where(inside, c, 0.0)
            elif mode == 2 and thresholds[m] < 1 << 24:
                keep = stream_bits(int(keys[m]), stop - start, start=start, device=device) < int(thresholds[m])
                c = torch.where(keep, c, 0.0)
            total = total + c
            contributions.append(c)
        if consensus:
            positive = total >= 0
            numerator = torch.zeros_like(total)
            agreeing = torch.zeros_like(total)
            for c, w in zip(contributions, weight_t):
                agree = torch.where(positive, c > 0, c < 0)
                numerator = numerator + torch.where(agree, c, 0.0)
                agreeing = agreeing + torch.where(agree, w, 0.0)
            divisor: torch.Tensor | float = torch.where(agreeing == 0, 1.0, agreeing)
        else:
            numerator, divisor = total, weight_sum_t
        if normalize:
            numerator = numerator / divisor
        if scale != np.float32(1.0):
            numerator = numerator * scale_t
        target[start:stop].copy_(base + numerator)
    if not in_place:
        out.copy_(target.view(out.shape))


_KERNEL: Any = None
def _fused_kernel() -> Any:
    """Compile (once per process, cached on disk by numba) the fused merge pass."""
    global _KERNEL
    if _KERNEL is None:
        _prefer_wide_vectors()
        import numba

        # numba's OpenMP pool, launched here once per process, sets the process's OpenMP thread count to numba's,
        # which torch reads as its own: torch's is kept (measured: a study worker given one torch thread scored
        # every trial after its first merge on two, beside another such worker on 2 cores)
        torch_threads = torch.get_num_threads()
        _KERNEL = _compile()
        numba.get_num_threads()  # (launches the pool)
        torch.set_num_threads(torch_threads)
    return _KERNEL


def _base_block(base: Any, start: int, stop: int, buffer: Any) -> Any:
    """The base of entries start..stop as float32: a view of a float32 base, else widened into ``buffer``
    (typed per dtype by ``_compile``)."""
    raise NotImplementedError  # (numba only: see the overload in _compile)


def _merge_block(target: Any, base: Any, rows: Any, spreads: Any, first: Any, contributions: Any, total: Any,
                 num: Any, div: Any, subtract: Any, coefs: Any, weights: Any, lows: Any, highs: Any, thresholds: Any,
                 keys: Any, mode: Any, consensus: Any, normalize: Any, scale: Any, weight_sum: Any, start: Any) -> None:
    """One block of the fused pass: the sources unrolled in one pass over the entries where their parameters are
    tuples, else a pass per source (typed by ``_compile``)."""
    raise NotImplementedError  # (numba only: see the overload in _compile)


def _dropped_by_spread(*args: Any) -> None:
    """DELLA's contributions (``contribute``'s mode 3) where the kernel has ``spreads``, else nothing (typed by
    ``_compile``, so that a kernel without spreads carries no code for them)."""
    raise NotImplementedError  # (numba only: see the overload in _compile)


def _spread_of(spreads: Any, m: int) -> Any:
    """Source ``m``'s spread as a one-source tuple, or None where the kernel has none (typed by ``_compile``)."""
    raise NotImplementedError  # (numba only: see the overload in _compile)


def _value(row: Any, j: int) -> Any:
    """Entry ``j`` of a row as float32: the entry itself, or the bfloat16 bits << 16, reinterpreted (exactly the
    float32 value; read where it is used, so that no widened copy is written; typed by ``_compile``)."""
    raise NotImplementedError  # (numba only: see the overload in _compile)


def _subtracts(deltas: Any) -> bool:
    """Whether the kernel's rows are the sources (the base to subtract) rather than task vectors: a
    constant per type, so that the kernel's loops carry no branch (typed by ``_compile``)."""
    raise NotImplementedError  # (numba only: see the overload in _compile)


def _store(out: Any, i: int, value: Any) -> None:
    """Write the float32 ``value`` at ``out[i]``: float32, or bfloat16 bits rounded to nearest even as torch rounds
    them (typed per dtype by ``_compile``)."""
    raise NotImplementedError  # (numba only: see the overload in _compile)


def _compile() -> Any:
    import numba
    from numba import types
    from numba.extending import intrinsic, overload

    bias, sixteen, nan16 = np.uint32(0x7FFF), np.uint32(16), np.uint16(0x7FC0)

    @intrinsic
    def _as_float32(typingctx, bits):  # type: ignore[no-untyped-def]
        """The float32 whose bits are ``bits`` (a uint32): one bitcast, which LLVM vectorises."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        return types.float32(types.uint32), codegen

    @intrinsic
    def _as_uint32(typingctx, value):  # type: ignore[no-untyped-def]
        """The bits of the float32 ``value``."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], context.get_value_type(types.uint32))

        return types.uint32(types.float32), codegen

    _add32, _kept, _drawn = _stream_intrinsics()

    @overload(_store, inline="always")
    def _store_typed(out, i, value):  # type: ignore[no-untyped-def]
        if out.dtype == types.float32:

            def store(out, i, value):  # type: ignore[no-untyped-def]
                out[i] = value

            return store
        if out.dtype == types.uint16:  # a bfloat16 model: torch's round_to_nearest_even, NaN as 0x7FC0

            def store16(out, i, value):  # type: ignore[no-untyped-def]
                b = _as_uint32(value)
                nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
                rounded = np.uint16((b + bias + ((b >> sixteen) & np.uint32(1))) >> sixteen)
                out[i] = np.uint16(nan) * nan16 + np.uint16(not nan) * rounded  # no branch (numba's inliner
                # loses a conditional expression's variable here: a NumbaIRAssumptionWarning)

            return store16
        return None

    def _task_vectors(deltas):  # type: ignore[no-untyped-def]
        """The float32 state: task vectors (the other states hold the sources, from which the base is subtracted)."""
        return not isinstance(deltas, types.BaseTuple) and deltas.dtype == types.float32

    @overload(_base_block, inline="always")
    def _base_block_typed(base, start, stop, buffer):  # type: ignore[no-untyped-def]
        if base.dtype == types.float32:
            return lambda base, start, stop, buffer: base[start:stop]

        def widen(base, start, stop, buffer):  # type: ignore[no-untyped-def]
            row, stored = buffer[: stop - start], base[start:stop]
            for j in range(row.size):  # indexed from 0 through a slice: no negative-index check, vectorised loads
                row[j] = _value(stored, j)
            return row

        return widen

    @overload(_value, inline="always")
    def _value_typed(row, j):  # type: ignore[no-untyped-def]
        if row.dtype == types.float32:
            return lambda row, j: row[j]
        if row.dtype == types.uint16:
            return lambda row, j: _as_float32(np.uint32(row[j]) << sixteen)
        return None

    @overload(_subtracts, inline="always")
    def _subtracts_typed(deltas):  # type: ignore[no-untyped-def]
        if _task_vectors(deltas):
            return lambda deltas: False
        return lambda deltas: True

    mask, s32, golden, one32 = np.uint64(0xFFFFFFFF), np.uint64(32), np.uint32(_GOLDEN32), np.uint32(1)
    zero, one, two24 = np.float32(0.0), np.float32(1.0), np.float32(1 << 24)
    # entries per block: a worker's scratch (the base widened, a contribution row per source and the total: 20 KB
    # for 3 sources) then stays in a 32 KB L1 data cache (measured: 8192 entries, in
    # L2, were up to 1.3 x slower for 16-bit states; benchmarks/kernel_speed.py)
    block = 1_024

    def dropped_by_spread(c, keep, total, rows, spreads, first, base, subtract, coefs, lows, highs, keys, start,  # type: ignore[no-untyped-def]
                          more):
        """``contribute``'s DELLA mode (Deep et al. 2024, Sec. 3, as ``della`` computes it): v = d w, kept where
        the draw / 2^24 is below p = low + width * spread (its integer below p 2^24: both exact in float32), as
        v / p; a model not dropped has low 1 and width 0, so p = 1 (every draw is below 2^24 and v / 1 is v).
        ``spreads``: each model's ranks, then the span: the spread is rank / span in float32, as
        ``MagnitudeRanks.spread`` divides it."""
        models = len(coefs)
        span = np.float32(spreads[-1][0])
        g = np.uint32(np.uint32((start + 1) & mask) * golden)  # the stream's counter, as in the random mode
        for j in range(total.size):
            b, i, tot = base[j], first + np.uint64(j), total[j]
            tot = tot if more else zero
            for m in range(models):
                key = keys[m]
                v = _value(rows[m], i)
                v = (v - b if subtract else v) * coefs[m]
                p = lows[m] + highs[m] * (np.float32(spreads[m][i]) / span)  # the rank's spread
                y = v / p if _drawn(_add32(g, np.uint32(key & mask)), np.uint32(key >> s32)) < p * two24 else zero
                if keep:
                    c[m, j] = y
                tot = tot + y
            total[j] = tot
            g = _add32(g, golden)

    @overload(_dropped_by_spread, inline="always")
    def _dropped_by_spread_typed(c, keep, total, rows, spreads, first, base, subtract, coefs, lows, highs, keys,  # type: ignore[no-untyped-def]
                                 start, more):
        if not isinstance(spreads, types.NoneType):
            return dropped_by_spread

        def nothing(c, keep, total, rows, spreads, first, base, subtract, coefs, lows, highs, keys, start, more):  # type: ignore[no-untyped-def]
            return None  # (no spreads, no DELLA: no code for it)

        return nothing

    @overload(_spread_of, inline="always")
    def _spread_of_typed(spreads, m):  # type: ignore[no-untyped-def]
        if isinstance(spreads, types.NoneType):
            return lambda spreads, m: None
        return lambda spreads, m: (spreads[m], spreads[-1])

    # One loop over the entries per sparsification mode, each branch-free so that LLVM vectorises it, with the
    # sources unrolled in it (their parameters are tuples: a constant count): the task vectors' entries d (the row
    # itself, or the source row minus the base: the same float32 subtraction as ``build``), their contributions c_m
    # summed in the sources' order into the total (from zero, or from the total so far where ``more``), and kept
    # for the sign consensus, where there is one. ``rows``: indexed by source, then by entry ``first + j`` (unsigned:
    # no negative-index check in the loop).
    @numba.njit(inline="always")
    def contribute(c, keep, total, rows, spreads, first, base, subtract, coefs, mode, lows, highs, thresholds,  # type: ignore[no-untyped-def]
                   keys, start, more):
        models = len(coefs)
        if mode == 1:
            # TIES: kept at or above the low cut in (magnitude, index) order (window_bounds: nothing is above its
            # window); the entry's index in the tensor carried in 32 bits (a tensor has at most 2^32 entries:
            # _ranked), so that the loop keeps float32's vector width (64-bit lanes: TIES 1.4 x slower on Zen 4)
            at = np.uint32(start & mask)
            for j in range(total.size):
                b, i, tot = base[j], first + np.uint64(j), total[j]
                tot = tot if more else zero
                for m in range(models):
                    v = _value(rows[m], i)
                    x = v - b if subtract else v
                    a = abs(x)
                    low = lows[m]
                    inside = (a > low) | ((a == low) & (at >= np.uint32(thresholds[m])))
                    y = x * coefs[m] if inside else zero
                    if keep:
                        c[m, j] = y
                    tot = tot + y
                total[j] = tot
                at = _add32(at, one32)
        elif mode == 4:  # breadcrumbs: below the high cut too
            at = np.uint32(start & mask)
            for j in range(total.size):
                b, i, tot = base[j], first + np.uint64(j), total[j]
                tot = tot if more else zero
                for m in range(models):
                    v = _value(rows[m], i)
                    x = v - b if subtract else v
                    a = abs(x)
                    low, high = lows[m], highs[m]
                    inside = ((a > low) | ((a == low) & (at >= np.uint32(thresholds[m])))) \
                        & ((a < high) | ((a == high) & (at < np.uint32(keys[m]))))
                    y = x * coefs[m] if inside else zero
                    if keep:
                        c[m, j] = y
                    tot = tot + y
                total[j] = tot
                at = _add32(at, one32)
        elif mode == 2:
            # entry j's counter (start + 1 + j) * golden carried through the loop in 32 bits (mod 2^32: a vector add
            # where the product was a multiply and a 64-bit counter), source m's h that plus its k_lo; kept where
            # u = (x >> 8) / 2^24 < density  <=>  (x >> 8) < ceil(density * 2^24): exact, integer-only
            g = np.uint32(np.uint32((start + 1) & mask) * golden)
            for j in range(total.size):
                b, i, tot = base[j], first + np.uint64(j), total[j]
                tot = tot if more else zero
                for m in range(models):
                    key = keys[m]
                    h = _add32(g, np.uint32(key & mask))
                    v = _value(rows[m], i)
                    v = v - b if subtract else v  # loaded unconditionally: a select, not a branch
                    y = v * coefs[m] if _kept(h, np.uint32(key >> s32), np.uint32(thresholds[m])) else zero
                    if keep:
                        c[m, j] = y
                    tot = tot + y
                total[j] = tot
                g = _add32(g, golden)
        elif mode == 3:  # DELLA's (compiled only where there are spreads)
            _dropped_by_spread(c, keep, total, rows, spreads, first, base, subtract, coefs, lows, highs, keys, start,
                               more)
        else:
            for j in range(total.size):
                b, i, tot = base[j], first + np.uint64(j), total[j]
                tot = tot if more else zero
                for m in range(models):
                    v = _value(rows[m], i)
                    y = (v - b if subtract else v) * coefs[m]
                    if keep:
                        c[m, j] = y
                    tot = tot + y
                total[j] = tot

    @numba.njit(inline="always")
    def elect(total):  # type: ignore[no-untyped-def]
        """The elected sign as a factor: +1 where the total is >= 0, else -1."""
        return one if total >= zero else -one

    @numba.njit(inline="always")
    def agrees(c, sign):  # type: ignore[no-untyped-def]
        """Whether a contribution has the elected sign (a zero one never agrees): c * sign is c or -c exactly, so this
        is the pure function's (c > 0 where the total is >= 0, else c < 0) for every c, NaN included, in two
        vector operations instead of that select's seven (counted in the compiled loop; the last source's loop went
        from 70 instructions to 38 on AVX2)."""
        return c * sign > zero

    @numba.njit(inline="always")
    def finish(v, divisor, normalize, scale):  # type: ignore[no-untyped-def]
        """Normalise (a divisor of 0 counts as 1) and scale (always multiplied: by 1 it is exact, where a test of it
        was a branch in every iteration of the compiled loop)."""
        if normalize:
            v = v / (one if divisor == zero else divisor)
        return v * scale

    @numba.njit(inline="always")
    def add_agreeing(sign, contributions, weights, j, num, div):  # type: ignore[no-untyped-def]
        """The sums with each source's agreeing term at entry j added, in the sources' order."""
        for m in range(len(weights)):
            c = contributions[m, j]
            agree = agrees(c, sign)
            num = num + (c if agree else zero)
            div = div + (weights[m] if agree else zero)
        return num, div

    @numba.njit(inline="always")
    def close(target, base, total, contributions, weights, normalize, scale, num, div, more):  # type: ignore[no-untyped-def]
        """The elected sign, the sources' agreeing terms added to the sums (from zero, or from ``num`` and ``div``
        where ``more``), each entry finished and stored with the base."""
        for j in range(total.size):
            n, d = num[j], div[j]
            n, d = add_agreeing(elect(total[j]), contributions, weights, j, n if more else zero, d if more else zero)
            _store(target, j, base[j] + finish(n, d, normalize, scale))

    @numba.njit(inline="always")
    def store_total(target, base, total, weight_sum, normalize, scale):  # type: ignore[no-untyped-def]
        """Without the sign consensus: each entry's total finished over the weights' sum and stored with the base."""
        for j in range(total.size):
            _store(target, j, base[j] + finish(total[j], weight_sum, normalize, scale))

    @numba.njit(inline="always")
    def sum_agreeing(total, contributions, weights, num, div, more):  # type: ignore[no-untyped-def]
        """``close`` for sources before the last, one by one: the sums written back."""
        for j in range(total.size):
            n, d = num[j], div[j]
            num[j], div[j] = add_agreeing(elect(total[j]), contributions, weights, j, n if more else zero,
                                          d if more else zero)

    def merge_block(target, base, rows, spreads, first, contributions, total, num, div, subtract, coefs,  # type: ignore[no-untyped-def]
                    weights, lows, highs, thresholds, keys, mode, consensus, normalize, scale, weight_sum, start):
        """One block: the contributions and their total, then the sign consensus or the total, finished and stored
        with the base. ``keep`` and ``normalize`` are constants at each call, so that LLVM drops their branches in
        each inlined copy (with the flag passed through, the store of ``keep`` was predicated: a masked store, which
        on AVX2 made TIES 1.5 x slower; always storing made linear merges up to 1.5 x slower)."""
        if consensus:
            contribute(contributions, True, total, rows, spreads, first, base, subtract, coefs, mode, lows, highs,
                       thresholds, keys, start, False)
            if normalize:
                close(target, base, total, contributions, weights, True, scale, num, div, False)
            else:
                close(target, base, total, contributions, weights, False, scale, num, div, False)
        else:
            contribute(contributions, False, total, rows, spreads, first, base, subtract, coefs, mode, lows, highs,
                       thresholds, keys, start, False)
            store_total(target, base, total, weight_sum, normalize, scale)

    def merge_block_by_source(target, base, rows, spreads, first, contributions, total, num, div, subtract,  # type: ignore[no-untyped-def]
                              coefs, weights, lows, highs, thresholds, keys, mode, consensus, normalize, scale,
                              weight_sum, start):
        """``merge_block`` for many sources (parameters as arrays): a pass over the entries per source (each a
        one-source tuple), the total and the sums carried between them in memory."""
        models = len(coefs)
        for m in range(models):
            c = contributions[m : m + 1]
            if consensus:
                contribute(c, True, total, (rows[m],), _spread_of(spreads, m), first, base, subtract, (coefs[m],),
                           mode, (lows[m],), (highs[m],), (thresholds[m],), (keys[m],), start, m > 0)
            else:
                contribute(c, False, total, (rows[m],), _spread_of(spreads, m), first, base, subtract, (coefs[m],),
                           mode, (lows[m],), (highs[m],), (thresholds[m],), (keys[m],), start, m > 0)
        if consensus:
            for m in range(models - 1):
                sum_agreeing(total, contributions[m : m + 1], (weights[m],), num, div, m > 0)
            last = contributions[models - 1 : models]
            if normalize:
                close(target, base, total, last, (weights[models - 1],), True, scale, num, div, models > 1)
            else:
                close(target, base, total, last, (weights[models - 1],), False, scale, num, div, models > 1)
        else:
            store_total(target, base, total, weight_sum, normalize, scale)

    @overload(_merge_block, inline="always")
    def _merge_block_typed(target, base, rows, spreads, first, contributions, total, num, div, subtract,  # type: ignore[no-untyped-def]
                           coefs, weights, lows, highs, thresholds, keys, mode, consensus, normalize, scale, weight_sum,
                           start):
        return merge_block if isinstance(coefs, types.BaseTuple) else merge_block_by_source

    @numba.njit(parallel=True, cache=True, nogil=True)
    def kernel(out, base, deltas, spreads, coefs, weights, lows, highs, thresholds, keys,  # type: ignore[no-untyped-def]
               mode, consensus, normalize, scale, offset, threads):
        models, n = len(deltas), base.size
        subtract = _subtracts(deltas)
        weight_sum = zero
        for m in range(models):
            weight_sum = weight_sum + weights[m]
        if abs(weight_sum) < np.float32(1e-8):
            weight_sum = one
        blocks = (n + block - 1) // block
        workers = max(1, min(threads, blocks))
        for w in numba.prange(workers):
            # each worker's scratch, allocated once: a contiguous run of blocks per worker
            base_buffer = np.empty(block, dtype=np.float32)
            contributions = np.empty((models, block), dtype=np.float32)
            total = np.empty(block, dtype=np.float32)
            numerator = np.empty(block, dtype=np.float32)  # (the sums between passes, for many sources only)
            divisor = np.empty(block, dtype=np.float32)
            for b in range(w * blocks // workers, (w + 1) * blocks // workers):
                start, stop = b * block, min(n, (b + 1) * block)
                size = stop - start
                base_block = _base_block(base, start, stop, base_buffer)
                target = out[start:stop]  # (indexed from 0, so that the stores vectorise: see _base_block)
                _merge_block(target, base_block, deltas, spreads, np.uint64(start), contributions, total[:size],
                             numerator, divisor, subtract, coefs, weights, lows, highs, thresholds, keys, mode,
                             consensus, normalize, scale, weight_sum, start + offset)

    return kernel
