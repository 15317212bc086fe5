"""The fused merge kernel alone, on one synthetic tensor: time per entry and source, and its ratio to the bound.

One tensor of ``--entries`` entries (seeded random base, ``--sources`` sources perturbed from it), prepared once
per state: float32 task vectors, bfloat16 sources kept as stored (widened in the kernel, a bfloat16 model
written), and float32 sources streamed (read by the kernel from their views). Per state and method (TIES,
DARE-TIES, linear): the median of ``--repeats`` merges after a warm-up; the bound is the state's bytes read
(base + sources) and the model's bytes written, over a large-copy bandwidth measured in the same run (so the
ratio, not the seconds, is the figure on a noisy machine). No model, no I/O: this isolates the kernel that every
trial of a parameter-space study runs once per tensor.

    python benchmarks/kernel_speed.py [--entries 30000000] [--sources 3] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from merge_speed import copy_bandwidth

from evoopt.merge import PreparedTensor, merge_prepared

METHODS = {"ties": {"sparsification": "magnitude", "consensus": True, "normalize": True},
           "dare_ties": {"sparsification": "random", "consensus": True, "normalize": True},
           "linear": {"sparsification": "none", "consensus": False, "normalize": True}}


def states(n: int, sources: int) -> dict[str, tuple[PreparedTensor, torch.dtype, int]]:
    """Each state with the model's dtype and the bytes one merge must read and write."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g) * 0.02
    xs = [base + torch.randn(n, generator=g) * 0.002 for _ in range(sources)]
    b16, x16 = base.to(torch.bfloat16), [x.to(torch.bfloat16) for x in xs]
    return {
        "float32 task vectors": (PreparedTensor.build("w", base, xs, magnitudes=True), torch.float32,
                                 4 * n * (sources + 2)),
        "bfloat16 stored": (PreparedTensor.build("w", b16, x16, magnitudes=True, keep_dtype=True), torch.bfloat16,
                            2 * n * (sources + 2)),
        "float32 streamed": (PreparedTensor.streamed("w", base, xs, magnitudes=True), torch.float32,
                             4 * n * (sources + 2)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=30_000_000)
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    n, k = args.entries, args.sources
    bandwidth = copy_bandwidth()
    print(f"{n:,} entries, {k} sources, {torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'state':<22}{'method':<11}{'per merge':>11}{'ns / entry / source':>21}{'x the bound':>13}")
    results = {"entries": n, "sources": k, "copy_bandwidth_GBps": bandwidth / 1e9, "rows": []}
    for state, (prepared, dtype, moved) in states(n, k).items():
        out = torch.empty(n, dtype=dtype)
        for method, kwargs in METHODS.items():
            run = dict(weights=[1.0 - 0.2 * m for m in range(k)], densities=[0.5] * k, seed=1, **kwargs)
            merge_prepared(prepared, out, **run)  # warm-up (and the kernel's compilation)
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                merge_prepared(prepared, out, **run)
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            row = {"state": state, "method": method, "median_s": median, "ns_per_entry_source": 1e9 * median / n / k,
                   "ratio_to_bound": median / (moved / bandwidth)}
            results["rows"].append(row)
            print(f"{state:<22}{method:<11}{median:>10.3f}s{row['ns_per_entry_source']:>21.2f}"
                  f"{row['ratio_to_bound']:>13.2f}")
    if args.json:
        from evoopt.models.io import atomic_write

        atomic_write(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
