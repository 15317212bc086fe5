"""Every merge method once on CUDA tensors, against the same merge on the CPU (part 2 of gpu_check.sh).

A weight matrix and a bias of MiniLM's feed-forward shape, three experts as seeded perturbations of a seeded base;
Fisher's and RegMean's statistics made on the CPU, as a study estimates them. Each method's result on the GPU is
compared with its result on the CPU (the largest absolute difference): a method that makes a tensor on the wrong
device fails here with its error, not in a user's study.

    python benchmarks/gpu_methods.py OUT.json [--device cuda]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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
            b = base[key].to(where) if method.needs_base else None
            tensors = [e[key].to(where) for e in experts[:n]]
            prepared = method.prepare(b, tensors) if method.prepare is not None and b is not None else None
            merged.append(method.apply(b, tensors, coefficients, name=key, statistics=stats, prepared=prepared))
        if merged[1].device.type != torch.device(device).type:
            raise RuntimeError(f"the merge of {key} came back on {merged[1].device}")
        differences.append(float((merged[0] - merged[1].cpu()).abs().max()))
    return {"ok": True, "max_abs_difference_to_cpu": max(differences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="where to write each method's result")
    parser.add_argument("--device", default="cuda", help="the device to check (default cuda; cpu checks the script)")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(384, 1536, generator=gen), "b": torch.randn(384, generator=gen)}
    experts = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    result: dict[str, Any] = {}
    for name in available_methods():
        try:
            result[name] = check(name, args.device, base, experts, gen)
        except Exception as error:  # (recorded: the next method still runs)
            result[name] = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(name, result[name], flush=True)
    try:  # RegMean at alpha 1 on a singular Gram matrix (64 examples of 1536 features): one answer on every device
        from evoopt.merge._methods import regmean

        inputs = [torch.randn(64, 1536, generator=gen) for _ in range(3)]
        grams = [x.T @ x for x in inputs]
        answers = [regmean([e["w"].to(where) for e in experts], grams=grams, alpha=1.0).cpu()
                   for where in ("cpu", args.device)]
        result["regmean singular"] = {"ok": True, "max_abs_difference_to_cpu": float((answers[0] - answers[1]).abs()
                                                                                      .max())}
    except Exception as error:
        result["regmean singular"] = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    print("regmean singular", result["regmean singular"], flush=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
