"""Every merge method once on CUDA tensors, against the same merge on the CPU (part 2 of gpu_check.sh).

A weight matrix and a bias of MiniLM's feed-forward shape, three experts as seeded perturbations of a seeded base;
Fisher's and RegMean's statistics made on the CPU, as a study estimates them. Each method's result on the GPU is
compared with its result on the CPU (the largest absolute difference, and whether the bytes are the same): a method
that makes a tensor on the wrong device fails here with its error, not in a user's study (``failed_on`` says which
side failed). Then the path a study's trials take: ``merge_prepared`` of bfloat16 sources (linear, TIES, DARE-TIES,
breadcrumbs), its magnitude grid sorted on the GPU as the GPU path's Merger sorts it (against the CPU's grid), the
state on the GPU and in host memory, against the same torch pass on the CPU, whose bytes are the numba kernel's
(property tests): the bytes should be the same. The JSON is rewritten after every
check (a run cut short keeps what it measured).

    python benchmarks/gpu_methods.py OUT.json [--device cuda]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evoopt.merge import available_methods, get_method


def check(name: str, device: str, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
          gen: torch.Generator) -> dict[str, Any]:
    method = get_method(name)
    n = 2 if method.max_models == 2 else len(experts)
    coefficients = {k: [{"weight": 1.0, "epsilon": 0.05}.get(k, 0.5)] * n for k in method.per_model}
    differences = []
    for key in base:
        stats = None
        if method.statistic == "fisher":
            stats = [torch.rand(base[key].shape, generator=gen) for _ in range(n)]
        elif method.statistic == "gram" and base[key].ndim == 2:
            inputs = [torch.randn(64, base[key].shape[1], generator=gen) for _ in range(n)]
            stats = [x.T @ x for x in inputs]
        merged = []
        for where in ("cpu", device):
            try:
                b = base[key].to(where) if method.needs_base else None
                tensors = [e[key].to(where) for e in experts[:n]]
                prepared = method.prepare(b, tensors) if method.prepare is not None and b is not None else None
                merged.append(method.apply(b, tensors, coefficients, name=key, statistics=stats, prepared=prepared))
            except Exception as error:
                raise Failed(where, error) from None
        if merged[1].device.type != torch.device(device).type:
            raise Failed(device, RuntimeError(f"the merge of {key} came back on {merged[1].device}"))
        differences.append(_compared(merged[0], merged[1]))
    return {"ok": True, "max_abs_difference_to_cpu": max(d["max_abs_difference_to_cpu"] for d in differences),
            "identical_to_cpu": all(d["identical_to_cpu"] for d in differences)}


class Failed(Exception):
    """A check's error, with the side it happened on (the CPU's reference, or the device)."""

    def __init__(self, where: str, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {str(error)[:300]}")
        self.where = where


def _compared(cpu: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    other = other.cpu()
    return {"max_abs_difference_to_cpu": float((cpu.float() - other.float()).abs().max()),
            "identical_to_cpu": bool(torch.equal(cpu, other))}


FAST_PATH = {"linear": {}, "ties": {"sparsification": "magnitude", "consensus": True},
             "dare_ties": {"sparsification": "random", "consensus": True},
             "breadcrumbs_ties": {"sparsification": "breadcrumbs", "consensus": True}}


def fast_path(name: str, device: str, base: torch.Tensor, experts: list[torch.Tensor]) -> dict[str, Any]:
    """A trial's merge of one bfloat16 parameter (the stored-dtype state) on ``device``, the state there and in
    host memory, against the CPU's."""
    from evoopt.merge import PreparedTensor, merge_prepared

    kwargs = dict(weights=[0.9, 0.7, 1.1], densities=[0.3, 0.5, 0.4], gammas=[0.05, 0.0, 0.1], normalize=True,
                  seed=7, **FAST_PATH[name])
    try:
        prepared = PreparedTensor.build("layer.w", base, experts, magnitudes=True, keep_dtype=True)
        # the CPU's torch pass (an out that is not contiguous): the kernel's bytes (property tests), without
        # compiling the kernel for this dtype here (about 28 s on 2 cores, beyond the part's limit)
        kernel = torch.empty(2 * base.numel(), dtype=base.dtype)[::2]
        merge_prepared(prepared, kernel, **kwargs)  # type: ignore[arg-type]
    except Exception as error:
        raise Failed("cpu", error) from None
    try:  # (the grid sorted on the device, as the GPU path's Merger does: the same grid)
        sorted_there = PreparedTensor.build("layer.w", base, experts, magnitudes=True, keep_dtype=True,
                                            sort_on=torch.device(device))
    except Exception as error:
        raise Failed(device, error) from None
    same = [np.array_equal(a, b) for a, b in ((prepared.grid_values, sorted_there.grid_values),
                                              (prepared.grid_indices, sorted_there.grid_indices))]
    found: dict[str, Any] = {"ok": True, "grid_sorted_on_device_identical": all(same)}
    for state, held in (("state on the device", sorted_there.to(torch.device(device))),
                        ("state in host memory", sorted_there)):
        try:
            out = torch.empty(base.numel(), dtype=base.dtype, device=device)
            merge_prepared(held, out, **kwargs)  # type: ignore[arg-type]
        except Exception as error:
            raise Failed(device, error) from None
        found[state] = _compared(kernel, out)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="where to write each method's result")
    parser.add_argument("--device", default="cuda", help="the device to check (default cuda; cpu checks the script)")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(384, 1536, generator=gen), "b": torch.randn(384, generator=gen)}
    experts = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    result: dict[str, Any] = {}

    def record(name: str, run: Any) -> None:
        try:
            result[name] = run()
        except Failed as error:  # (recorded: the next check still runs)
            result[name] = {"ok": False, "failed_on": error.where, "error": str(error)}
        except Exception as error:
            result[name] = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(name, result[name], flush=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.rename(args.json)

    for name in available_methods():
        record(name, lambda name=name: check(name, args.device, base, experts, gen))
    def singular() -> dict[str, Any]:  # RegMean at alpha 1 on a singular Gram matrix (64 examples of 1536
        from evoopt.merge._methods import regmean  # features): one answer on every device

        inputs = [torch.randn(64, 1536, generator=gen) for _ in range(3)]
        grams = [x.T @ x for x in inputs]
        answers = [regmean([e["w"].to(where) for e in experts], grams=grams, alpha=1.0)
                   for where in ("cpu", args.device)]
        return {"ok": True, **_compared(answers[0], answers[1])}

    record("regmean singular", singular)
    sixteen = base["w"].to(torch.bfloat16).reshape(-1)
    bf16_experts = [e["w"].to(torch.bfloat16).reshape(-1) for e in experts]
    for name in FAST_PATH:
        record(f"fast path {name}", lambda name=name: fast_path(name, args.device, sixteen, bf16_experts))


if __name__ == "__main__":
    main()
