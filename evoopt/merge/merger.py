"""Apply a recipe: open and check the sources once, then merge into one preloaded model.

:class:`Merger` is what every trial of a study uses: the target model is built
once, the coefficient-independent work (task vectors, magnitude order statistics)
is done once, and each :meth:`Merger.merge` writes a candidate's weights into the
model's parameters in place: no re-instantiation, no disk round trip.
"""

from __future__ import annotations

import itertools
import logging
import mmap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evoopt.errors import problems
from evoopt.merge import PreparedTensor, merge_prepared
from evoopt.merge._prepared import STORED
from evoopt.merge.recipe import Recipe, RecipeError
from evoopt.models.io import (
    ModelSourceError,
    TensorSource,
    card_header,
    check_compatible,
    export_model,
    load_target,
    merge_targets,
    open_source,
    reference_problem,
    registered_scheme,
    resolve_path,
    tied_names,
    unmerged,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GPU_SHARE = 0.75  # the share of the GPU's free memory the fast path's state may take (the rest: evaluation)
PINNED_SLAB = 2**30  # bytes of a pinned block of the GPU path's state in host memory (:func:`state_layout`)
HUGE_PAGE = 2**21  # bytes of a transparent huge page on x86-64 (and of the smallest state worth advising for them)


def gpu_placement(state: int, free: int, reserve: float | None) -> tuple[bool, float]:
    """Whether a state of ``state`` bytes goes on a GPU with ``free`` bytes free, leaving ``reserve`` free for the
    evaluation (None: the rest of :data:`GPU_SHARE` of ``free``); and the reserve, for the next Merger over the
    same evaluation model (a method search: each method's state fits or not beside the ones placed before, the
    evaluation keeping what it had when the first was placed)."""
    reserve = (1 - GPU_SHARE) * free if reserve is None else reserve
    return state <= free - reserve, reserve


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: 'cuda' was asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


class Merger:
    """Sources opened and checked, the target model loaded, preprocessing cached.

    Args:
        recipe: sources, method and default coefficients.
        progress: called as ``progress(stage, done, total)`` during long steps.
        model: the model to merge into (another Merger's, over the same sources: a method search keeps
            one evaluation model for all its methods); default: loaded here.
        gpu_reserve: on the GPU path, the bytes of GPU memory the state must leave free for the evaluation
            (else it stays in host memory); default: the rest of :data:`GPU_SHARE` of what is free when the state
            is placed (:func:`gpu_placement`). A method search passes its first Merger's to the others.
    """

    def __init__(self, recipe: Recipe, *, progress: Progress | None = None,
                 model: PreTrainedModel | None = None, gpu_reserve: float | None = None) -> None:
        self.recipe, self.gpu_reserve = recipe, gpu_reserve
        self.method = recipe.merge_method
        self._progress = progress or (lambda stage, done, total: None)
        self.sources, self.base = _open_sources(recipe)
        structure = self.base or self.sources[0]
        self.device = pick_device(recipe.device)
        self.dtype = self._decide_dtype(structure)
        self.model = model if model is not None else load_target(structure, dtype=self.dtype, device=self.device)
        tied = tied_names(self.model)
        self.targets = {name: tensor for name, tensor in merge_targets(self.model, structure).items()
                        if not _excluded(recipe, tied.get(name, [name]))}
        labelled: dict[str, TensorSource] = {"base": self.base} if self.base else {}
        labelled.update({f"models[{i}]": s for i, s in enumerate(self.sources)})
        check_compatible(labelled, list(self.targets))
        for line in unmerged(labelled, "base" if self.base else "models[0]", recipe.excluded):
            logger.warning("merge: %s; no merge reads them and the merged model has none (list them in the "
                           "recipe's exclude to say so and silence this)", line)
        self.structure = structure
        self.statistics = self._estimate_statistics() if self.method.statistic else None
        self.in_out: set[str] = _in_out_weights(self.model) if self.method.statistic == "gram" else set()
        self.streamed = False  # the fast path's state is memory-mapped views of the sources (set by _prepare)
        self.prepared = self._prepare() if self.method.task_arithmetic is not None else None
        self.cached = self._prepare_method() if self.method.prepare is not None else {}
        if self.prepared is None:
            self._check_finite()  # once here; merge() then reads without re-checking

    @property
    def _sort_on(self) -> torch.device | None:
        """Where the magnitude grids are sorted: on the GPU on the GPU path (seconds, where one CPU core took most
        of a 1.5B model's setup), else by numpy (:func:`evoopt.merge._prepared._ranked`)."""
        return self.device if self.device.type == "cuda" else None

    def _check_finite(self) -> None:
        sources = [s for s in (self.base, *self.sources) if s is not None]
        for done, name in enumerate(self.targets):
            self._progress("checking sources", done, len(self.targets))
            for source in sources:
                source.get(name)

    def _decide_dtype(self, structure: TensorSource) -> torch.dtype:
        if self.recipe.dtype != "auto":
            return DTYPES[self.recipe.dtype]
        found: dict[str, Counter[torch.dtype]] = {}
        for label, source in [("base", self.base), *((f"models[{i}]", s) for i, s in enumerate(self.sources))]:
            if source is not None:
                found[label] = Counter(source.dtype(n) for n in source.keys() if source.dtype(n).is_floating_point)
        common = {label: c.most_common(1)[0][0] for label, c in found.items() if c}
        if len(set(common.values())) > 1:
            listed = ", ".join(f"{label}: {str(d).removeprefix('torch.')}" for label, d in common.items())
            raise RecipeError(f"dtype: sources are stored in different dtypes ({listed}); "
                              "set dtype (float32, bfloat16 or float16) in the recipe")
        return common.get("base", next(iter(common.values()), torch.float32))

    def _prepare(self) -> dict[str, PreparedTensor] | None:
        settings = self.method.task_arithmetic
        if settings is None or self.base is None or self.dtype == torch.float64:
            return None  # (float64 models: the fast path computes in float32, the pure function in float64)
        magnitudes = settings["sparsification"] in ("magnitude", "breadcrumbs")
        base = self.base
        # The state's dtype per tensor: the sources' own where they and the base share a 16-bit one
        # (stored-dtype state), else float32 task vectors.
        dtypes = {name: (base.dtype(name) if base.dtype(name) in STORED
                         and all(s.dtype(name) == base.dtype(name) for s in self.sources) else torch.float32)
                  for name in self.targets}
        state = sum(t.numel() * dtypes[n].itemsize * (len(self.sources) + 1) for n, t in self.targets.items())
        budget = self.recipe.memory_budget * 2**30 if self.recipe.memory_budget else available_memory()
        # The GPU path: the state on the GPU when it leaves the evaluation its reserve, else in pinned host
        # memory, copied to the GPU chunk by chunk for each candidate.
        on_device = False
        if self.device.type == "cuda":
            on_device, self.gpu_reserve = gpu_placement(state, torch.cuda.mem_get_info(self.device)[0],
                                                        self.gpu_reserve)
        pinned = self.device.type == "cuda" and not on_device
        models = len(self.sources)
        names = {dtype: [n for n in self.targets if dtypes[n] == dtype] for dtype in set(dtypes.values())}
        numels = {dtype: [models * self.targets[n].numel() for n in group] for dtype, group in names.items()}
        layouts = {dtype: state_layout(numels[dtype], dtype, pinned=pinned) for dtype in names}
        rounded = sum((sum(blocks) - sum(numels[dtype])) * dtype.itemsize for dtype, (blocks, _) in layouts.items())
        if state + rounded > budget:  # (pinned blocks are powers of two: what they hold beyond the state counts)
            return self._prepare_streamed(magnitudes, state + rounded, budget)
        if pinned:
            logger.info("merge: the preprocessed state (%.2f GiB) does not fit the GPU: kept in pinned host memory "
                        "(%.2f GiB more pinned, its blocks being powers of two)", state / 2**30, rounded / 2**30)
        views = {name: view for dtype, group in names.items()
                 for name, view in zip(group, state_views(numels[dtype], layouts[dtype], dtype, pinned=pinned))}
        scratch = np.empty(max(t.numel() for t in self.targets.values()), dtype=np.float32) if magnitudes else None
        prepared = {}
        for done, name in enumerate(self.targets):
            self._progress("preprocessing", done, len(self.targets))
            dtype, view = dtypes[name], views[name].view(models, -1)
            prepared[name] = PreparedTensor.build(
                name, base.get(name), [s.get(name) for s in self.sources], magnitudes=magnitudes,
                out=view, scratch=scratch, keep_dtype=dtype != torch.float32, sort_on=self._sort_on,
            )
        self._progress("preprocessing", len(self.targets), len(self.targets))
        return {name: p.to(self.device) for name, p in prepared.items()} if on_device else prepared

    def _prepare_streamed(self, magnitudes: bool, state: int, budget: float) -> dict[str, PreparedTensor]:
        """The state as memory-mapped views of the sources' files: only the magnitude grids are kept."""
        assert self.base is not None
        logger.info("merge: the preprocessed state (%.2f GiB) exceeds the memory budget (%.2f GiB): streaming the "
                    "sources from their files", state / 2**30, budget / 2**30)
        self.streamed = True
        self._check_finite()  # (the views are read as they are, unchecked, for every candidate)
        scratch = np.empty(max(t.numel() for t in self.targets.values()), dtype=np.float32) if magnitudes else None
        prepared = {}
        for done, name in enumerate(self.targets):
            self._progress("preprocessing", done, len(self.targets))
            views = [_view(s, name) for s in (self.base, *self.sources)]
            prepared[name] = PreparedTensor.streamed(name, views[0], views[1:], magnitudes=magnitudes, scratch=scratch,
                                                     sort_on=self._sort_on)
        self._progress("preprocessing", len(self.targets), len(self.targets))
        return prepared

    def _prepare_method(self) -> dict[str, Any]:
        """The method's own coefficient-independent part of each tensor (``MergeMethod.prepare``), once."""
        assert self.method.prepare is not None
        if self.base is None:
            return {}
        cached = {}
        for done, name in enumerate(self.targets):
            self._progress("preprocessing", done, len(self.targets))
            prepared = self.method.prepare(self.base.get(name).to(self.device),
                                           [s.get(name).to(self.device) for s in self.sources])
            if prepared is not None:
                cached[name] = prepared
        self._progress("preprocessing", len(self.targets), len(self.targets))
        return cached

    def merge(self, recipe: Recipe | None = None, *, seed: int | None = None) -> PreTrainedModel:
        """Write the merge of ``recipe``'s coefficients (default: the constructor's) into the model."""
        recipe = recipe or self.recipe
        if recipe.method != self.recipe.method or len(recipe.models) != len(self.sources):
            raise RecipeError("recipe: a Merger merges one method over one set of sources; build a new Merger")
        seed = recipe.seed if seed is None else seed
        count = len(self.sources)
        with torch.no_grad():
            for done, (name, target) in enumerate(self.targets.items()):
                self._progress("merging", done, len(self.targets))
                coefficients = recipe.coefficients(name, count)
                if self.prepared is not None:
                    self._merge_fast(name, target, coefficients, seed)
                    continue
                # The sources' memory-mapped views, not copies read anew for every candidate (the methods never
                # write into their arguments: tested); checked for NaN and inf once, when the Merger was built.
                base = _shaped(self.base, name).to(self.device) if self.base is not None else None
                tensors = [_shaped(s, name).to(self.device) for s in self.sources]
                if target.is_floating_point():
                    # a model wider than the sources (bfloat16 sources, float32 model): the methods compute and
                    # return in their inputs' dtype (the base's for some, the first model's for others), so the
                    # narrower inputs are widened, one tensor at a time
                    wide = target.element_size()
                    tensors = [t.to(target.dtype) if t.element_size() < wide else t for t in tensors]
                    base = base.to(target.dtype) if base is not None and base.element_size() < wide else base
                stats = self.statistics.get(name) if self.statistics is not None else None
                flipped = name in self.in_out  # RegMean solves for (out, in) weights: a Conv1D's, transposed
                if flipped:
                    base, tensors = None if base is None else base.T, [t.T for t in tensors]
                merged = self.method.apply(base, tensors, coefficients, seed=seed, name=name, statistics=stats,
                                           prepared=self.cached.get(name), out=None if flipped else target)
                merged = merged.T if flipped else merged
                if merged is not target:  # (a method that writes_into the model returns it: nothing to copy)
                    target.copy_(merged.reshape(target.shape))
        self._progress("merging", len(self.targets), len(self.targets))
        return self.model

    def _merge_fast(self, name: str, target: torch.Tensor, c: dict[str, Any], seed: int) -> None:
        assert self.prepared is not None and self.method.task_arithmetic is not None
        settings = self.method.task_arithmetic
        merge_prepared(
            self.prepared[name], target, weights=c["weight"], densities=c.get("density"),
            gammas=c.get("gamma"), sparsification=settings["sparsification"],
            consensus=settings["consensus"], normalize=bool(c.get("normalize", settings["normalize"])),
            scale=c.get("scale", 1.0), seed=seed,
        )

    def _estimate_statistics(self) -> dict[str, list[torch.Tensor]]:
        from evoopt.models.statistics import estimate_fisher, gram_matrices

        assert self.structure.folder is not None
        batches = calibration_batches(self.recipe, self.structure.folder)
        estimate = estimate_fisher if self.method.statistic == "fisher" else gram_matrices
        per_model: list[dict[str, torch.Tensor]] = []
        for i, source in enumerate(self.sources):
            self._progress("statistics", i, len(self.sources))
            model = load_target(source, dtype=torch.float32, device=torch.device("cpu"))
            per_model.append(estimate(model, batches))
            del model
        names = set(per_model[0])
        return {n: [stats[n] for stats in per_model] for n in names if all(n in s for s in per_model)}

    def export(self, out: Path, *, overwrite: bool = False, card: tuple[str, str] | None = None) -> Path:
        """Save the current merged model, with tokenizer, model card and recipe, atomically.

        ``card``: (how the weights were made, as YAML; model card) when the recipe does not say it
        (the Evolver's models).
        """
        if self.structure.folder is None:
            raise ModelSourceError(f"{self.structure.path}: export needs the base model's folder for its tokenizer")
        recipe_yaml, card_text = card or (self.recipe.to_yaml(), model_card(self.recipe))
        return export_model(
            self.model, out, tokenizer_from=self.structure.folder, recipe_yaml=recipe_yaml,
            model_card=card_text, overwrite=overwrite,
        )


def _excluded(recipe: Recipe, names: list[str]) -> bool:
    """Whether a weight is left out of the merge: any of its names (tied weights have several) excluded; one
    name of a tied pair excluded keeps both from the base (it merged both, or froze both, silently)."""
    excluded = [n for n in names if recipe.excluded(n)]
    if excluded and len(excluded) < len(names):
        logger.warning("merge: exclude names %s, which shares its tensor with %s (tied weights): both are kept "
                       "from the base", ", ".join(excluded), ", ".join(n for n in names if n not in excluded))
    return bool(excluded)


def _in_out_weights(model: torch.nn.Module) -> set[str]:
    """The weights stored (in, out): GPT-2's Conv1D layers (y = x W), where nn.Linear stores (out, in)."""
    from transformers.pytorch_utils import Conv1D

    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}


def available_memory() -> float:
    """Bytes of memory available to a new allocation now (Linux: MemAvailable), or infinity where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def huge_page_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D tensor in private anonymous memory that the kernel is asked to back with transparent huge
    pages (``madvise(MADV_HUGEPAGE)`` before the first touch; Linux, where THP is ``always`` or ``madvise``), so
    that the fast path's passes over its state, gigabytes read per candidate, have 512 x fewer pages to translate
    (fewer TLB misses). torch's own allocator does so only under ``THP_MEM_ALLOC_ENABLE=1``, read once per process.
    Measured on a 2-core AMD EPYC (Zen 4, THP ``madvise``), four rounds alternating with the state in small pages
    (``benchmarks/merge_speed.py --dtype bfloat16``, 3 x SmolLM2-135M): bfloat16 TIES 0.099-0.111 -> 0.090-0.093 s a
    candidate, DARE-TIES 0.098-0.100 -> 0.090-0.102 s; on 3 x 1.5B experts (``merge_scale.py``) TIES took 1.13 and
    1.68 s in two processes against 1.30 and 1.42 s, within that machine's spread between processes. Where the
    kernel refuses the advice (or has no THP), it is the same memory in small pages; elsewhere (no ``madvise``)
    ``torch.empty``."""
    nbytes = numel * dtype.itemsize
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes < HUGE_PAGE:
        return torch.empty(numel, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP off (never) or not built in: small pages
        pass
    return torch.frombuffer(region, dtype=dtype, count=numel)  # (the tensor keeps the mapping alive)


Layout = tuple[list[int], list[tuple[int, int]]]  # blocks' sizes, and each tensor's (block, offset), in entries


def state_layout(numels: list[int], dtype: torch.dtype, *, pinned: bool = False,
                 slab_bytes: int = PINNED_SLAB) -> Layout:
    """Where the fast path's state puts each tensor of one dtype (``numels`` entries each). In host memory: one
    block, the tensors one after the other (no heap fragmentation from hundreds of tensors). Pinned (the GPU path
    when the state does not fit the GPU): torch's caching host allocator rounds every pinned block up to the next
    power of two (a 20.4 GiB block pins 32 GiB; ``torch.cuda.memory.host_memory_stats``), so one block would pin up
    to twice the state; instead the tensors are packed first-fit decreasing into blocks of ``slab_bytes`` (or the
    next power of two of a larger tensor, the rest of its block filled by smaller ones), each block then cut to the
    power of two its tensors fill: what is pinned beyond the state is at most the last partly filled blocks."""
    if not pinned:
        return [sum(numels)], [(0, start) for start in itertools.accumulate(numels[:-1], initial=0)]
    slab = max(1, slab_bytes // dtype.itemsize)
    blocks: list[int] = []
    used: list[int] = []
    places: list[tuple[int, int]] = [(0, 0)] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        block = next((b for b, size in enumerate(blocks) if used[b] + numels[i] <= size), len(blocks))
        if block == len(blocks):
            blocks.append(max(slab, _power_of_two(numels[i])))
            used.append(0)
        places[i] = (block, used[block])
        used[block] += numels[i]
    return [_power_of_two(u) for u in used], places


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def state_views(numels: list[int], layout: Layout, dtype: torch.dtype, *, pinned: bool = False) -> list[torch.Tensor]:
    """The flat views of :func:`state_layout`'s blocks, one per tensor: pinned blocks from torch's pinned allocator
    (each a power of two: not rounded further), else in memory advised for huge pages."""
    sizes, places = layout
    blocks = [torch.empty(size, dtype=dtype, pin_memory=True) if pinned else huge_page_empty(size, dtype)
              for size in sizes]
    return [blocks[block][offset : offset + n] for (block, offset), n in zip(places, numels)]


def _view(source: TensorSource, name: str) -> torch.Tensor:
    """A tensor's memory-mapped view where its format has one, else the tensor read into memory."""
    mapped = source.mapped(name)
    return mapped if mapped is not None else source.get(name, check=False)


def _shaped(source: TensorSource, name: str) -> torch.Tensor:
    """:func:`_view` in the tensor's own shape."""
    return _view(source, name).view(source.shape(name))


def calibration_batches(recipe: Recipe, tokenizer_folder: Path) -> list[dict[str, torch.Tensor]]:
    """The recipe's calibration texts (training data, never dev or test), tokenised in batches."""
    from transformers import AutoTokenizer

    calibration = recipe.calibration
    if calibration is None:
        raise RecipeError(f"calibration: {recipe.method!r} needs calibration texts (calibration.texts)")
    path = resolve_path(calibration.texts, recipe.root)
    if not path.is_file():
        raise RecipeError(f"calibration.texts: {path} " + ("is a folder; give a text file, one text a line"
                                                           if path.is_dir() else "does not exist"))
    try:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise RecipeError(f"calibration.texts: {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                          "save it as UTF-8") from None
    texts = texts[: calibration.max_examples]
    if not texts:
        raise RecipeError(f"calibration.texts: {path} holds no non-empty lines")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return [
        dict(tokenizer(texts[i : i + calibration.batch_size], return_tensors="pt", padding=True,
                       truncation=True, max_length=calibration.max_length))
        for i in range(0, len(texts), calibration.batch_size)
    ]


def model_card(recipe: Recipe) -> str:
    """A Hugging Face model card naming the sources and the recipe."""
    method = recipe.merge_method
    lines = [
        *card_header("Merged model"),
        f"Merged with [evoopt](https://pypi.org/project/evoopt/) using **{method.name}** ({method.paper}).", "",
        "## Sources", "",
    ]
    if recipe.base:
        lines.append(f"- base: `{recipe.base}`")
    lines += [f"- `{s.model}`" for s in recipe.models]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def _open_sources(recipe: Recipe) -> tuple[list[TensorSource], TensorSource | None]:
    """The recipe's models and base, opened; every one that cannot be is named at once (``models[1].model: ...``):
    first what is found without building anything (a path that does not exist, an unknown expert), then what
    opening finds (a damaged file), the models a scheme would build (an expert trains) no longer opened once one
    has failed."""
    opened: dict[str, TensorSource] = {}
    references = [(f"models[{i}].model", s.model) for i, s in enumerate(recipe.models)]
    every = references + ([("base", recipe.base)] if recipe.base else [])
    unopened = [(where, problem) for where, reference in every
                if (problem := reference_problem(reference, recipe.root)) is not None]
    if recipe.merge_method.statistic and recipe.calibration is not None and \
            not (texts := resolve_path(recipe.calibration.texts, recipe.root)).is_file():
        unopened.append(("calibration.texts", f"{texts} " + ("is a folder; give a text file, one text a line"
                                                             if texts.is_dir() else "does not exist")))  # (read after
        # the models were opened and the target loaded: an expert trained first)
    for where, reference in every if not unopened else []:
        if unopened and registered_scheme(reference) is not None:
            continue
        try:
            opened[where] = open_source(resolve_path(reference, recipe.root))
        except ModelSourceError as error:
            unopened.append((where, str(error)))
    if len(unopened) == 1:
        raise ModelSourceError(f"{unopened[0][0]}: {unopened[0][1]}")
    if unopened:
        raise problems(ModelSourceError, "recipe", [f"{where}: {error}" for where, error in unopened],
                       heading=f"{len(unopened)} models cannot be opened")
    return [opened[where] for where, _ in references], opened.get("base")
