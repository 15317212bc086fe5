"""numba pieces shared by the fused merge kernel (:mod:`evoopt.merge._prepared`) and the methods' own passes
(:func:`della_merge`): the CPU target's vector width, the random stream's draws in 32-bit arithmetic, DELLA in one
pass. numba itself is imported (and the functions compiled) on first use."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from evoopt.merge._pieces import _FMIX1, _FMIX2, _GOLDEN32

# numba's own settings of its target CPU: where the user sets any, evoopt leaves the vector width to them
NUMBA_CPU_SETTINGS = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_ENABLE_AVX")


def wide_vector_features(features: Mapping[str, bool]) -> str | None:
    """LLVM's feature string for this CPU (``features``: LLVM's host feature map) with the preference for 256-bit
    vectors lifted, or None where the CPU has no AVX-512 (nothing to lift)."""
    if not features.get("avx512f"):
        return None
    named = [("+" if on else "-") + name for name, on in sorted(features.items()) if name != "prefer-256-bit"]
    return ",".join([*named, "-prefer-256-bit"])


def _prefer_wide_vectors() -> None:
    """On an AVX-512 CPU, let LLVM vectorise numba's loops 512 bits wide. Its tuning for Intel's AVX-512 CPUs
    prefers 256-bit vectors (against the clock drops of early ones), which halves the lanes of DARE's draw, the
    kernel's one compute-bound loop (integer hashing, two multiplies per entry): measured on a 2-core Xeon with
    AVX-512 (benchmarks/kernel_speed.py, 20M entries, two rounds each), bfloat16 DARE-TIES 3.34-3.59 -> 2.38-2.60
    x the bound, TIES and linear merges unchanged. numba has one target machine per process, so this holds for every
    numba function the process compiles; it is done before numba compiles anything and only where the user has not
    set numba's CPU options (``NUMBA_CPU_SETTINGS``). The merged bytes do not depend on the width (tests/merge)."""
    if any(os.environ.get(name) for name in NUMBA_CPU_SETTINGS):
        return
    import llvmlite.binding as llvm

    features = wide_vector_features(llvm.get_host_cpu_features())
    if features is None:
        return
    os.environ["NUMBA_CPU_FEATURES"] = features
    if "numba" in sys.modules:  # imported already (by another library): read its settings again
        from numba.core import config

        config.reload_config()


@functools.cache
def _stream_intrinsics() -> tuple[Any, Any, Any]:
    """numba intrinsics for :func:`~evoopt.merge._pieces.uniform_stream`'s draws in 32-bit arithmetic, shared by the
    fused kernel and DELLA's pass: ``_add32``, ``_kept`` and ``_drawn``."""
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _add32(typingctx, a, b):  # type: ignore[no-untyped-def]
        """a + b mod 2^32 in 32-bit arithmetic (numba's own promotes to 64 bits, which a vectorised loop then carries
        in twice the registers)."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.add(*args)

        return types.uint32(types.uint32, types.uint32), codegen  # (numba casts the arguments to these)

    def hashed(context, builder, h, hi):  # type: ignore[no-untyped-def]
        """The draw's integer (below 2^24) for ``h`` and ``k_hi`` in 32-bit IR: x = h xor k_hi, MurmurHash3's fmix32,
        then >> 8."""

        def const(v):  # type: ignore[no-untyped-def]
            return context.get_constant(types.uint32, v)

        x = builder.xor(h, hi)
        x = builder.xor(x, builder.lshr(x, const(16)))
        x = builder.mul(x, const(_FMIX1))
        x = builder.xor(x, builder.lshr(x, const(13)))
        x = builder.mul(x, const(_FMIX2))
        x = builder.xor(x, builder.lshr(x, const(16)))
        return builder.lshr(x, const(8))

    @intrinsic
    def _kept(typingctx, h, k_hi, below):  # type: ignore[no-untyped-def]
        """DARE's draw for entry ``index - 1`` (``uniform_stream``) from ``h = index * 0x9E3779B9 + k_lo`` (mod 2^32:
        a loop carries it by adding the constant, one vector add where the product was a multiply): whether the hash
        >> 8 is below ``below``, all in 32-bit arithmetic (the stream is defined mod 2^32), so that a vector holds 16
        lanes, not the 8 of numba's 64-bit integers: ``x = h xor k_hi``, then MurmurHash3's fmix32."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            h, hi, threshold = args
            return builder.icmp_unsigned("<", hashed(context, builder, h, hi), threshold)

        return types.boolean(types.uint32, types.uint32, types.uint32), codegen  # (arguments cast to these)

    @intrinsic
    def _drawn(typingctx, h, k_hi):  # type: ignore[no-untyped-def]
        """The draw itself, as ``_kept`` computes it: the hash >> 8, an integer below 2^24, as a float32 (exact)."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.uitofp(hashed(context, builder, *args), context.get_value_type(types.float32))

        return types.float32(types.uint32, types.uint32), codegen  # (arguments cast to these)

    return _add32, _kept, _drawn


def della_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], epsilons: Sequence[float], keys: Sequence[int],
                spreads: Sequence[torch.Tensor], *, consensus: bool, normalize: bool, scale: float) -> torch.Tensor:
    """:func:`evoopt.merge.della` for float32 CPU tensors in one numba pass over the entries, block by block (its torch
    formula makes a dozen passes, two of them int64 hashes: a SmolLM2-135M candidate took 19.8 x as long,
    ``benchmarks/merge_speed.py --methods della``). The same float32 operations in the same order: Drop (kept where
    the draw of stream ``keys[m]`` is below p = (d - eps) + 2 eps spread, as w tau / p), Elect, Fuse, so the same
    bytes (tested). ``spreads``: each model's :func:`~evoopt.merge.magnitude_spread`."""
    global _DELLA
    if _DELLA is None:
        _prefer_wide_vectors()
        _DELLA = _compile_della()
    flat = [t.contiguous().numpy().reshape(-1) for t in tensors]
    rank = [s.contiguous().numpy().reshape(-1) for s in spreads]
    out = torch.empty(base.shape, dtype=torch.float32)  # (contiguous, whatever the base's strides)
    _DELLA(out.numpy().reshape(-1), base.contiguous().numpy().reshape(-1), tuple(flat), tuple(rank),
           np.array(weights, dtype=np.float32), np.array([d < 1.0 for d in densities]),
           np.array([d - e for d, e in zip(densities, epsilons)], dtype=np.float32),
           np.array([2 * e for e in epsilons], dtype=np.float32),
           np.array([k & 0xFFFFFFFF for k in keys], dtype=np.uint32),
           np.array([k >> 32 for k in keys], dtype=np.uint32),
           consensus, normalize, np.float32(scale))
    return out


def _compile_della() -> Any:
    import numba

    add32, _, drawn = _stream_intrinsics()
    golden = np.uint32(_GOLDEN32)
    two24, zero, one, tiny = np.float32(1 << 24), np.float32(0), np.float32(1), np.float32(1e-8)
    BLOCK = 4096  # noqa: N806  (entries a block: its contributions, 16 KiB a model, stay in the L1/L2 cache)

    # error_model numpy: a float division by zero is IEEE's, as in torch, not Python's exception, whose check
    # keeps LLVM from vectorising the loops that divide
    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def merge(out, base, tensors, spreads, weights, drops, lows, widths, k_lo, k_hi,  # type: ignore[no-untyped-def]
              consensus, normalize, scale):
        # blocks of BLOCK entries, model by model: loops without branches that LLVM vectorises
        models, n = len(tensors), base.size
        c = np.empty((models, BLOCK), dtype=np.float32)
        scratch = np.empty((3, BLOCK), dtype=np.float32)
        for start in range(0, n, BLOCK):
            size = min(BLOCK, n - start)
            b = base[start:start + size]
            for m in range(models):
                row, w = c[m, :size], weights[m]
                t = tensors[m][start:start + size]
                if drops[m]:
                    spread, low, width, hi = spreads[m][start:start + size], lows[m], widths[m], k_hi[m]
                    h = np.uint32(np.uint32(start + 1) * golden + k_lo[m])  # entry j's counter, carried by adding
                    for j in range(size):
                        v = (t[j] - b[j]) * w
                        p = low + width * spread[j]
                        # the draw / 2^24 is below p exactly when its integer is below p 2^24 (both exact in float32)
                        row[j] = v / p if drawn(h, hi) < p * two24 else zero
                        h = add32(h, golden)
                else:
                    for j in range(size):
                        row[j] = (t[j] - b[j]) * w
            total, num, div = scratch[0, :size], scratch[1, :size], scratch[2, :size]
            total[:] = c[0, :size]
            for m in range(1, models):
                row = c[m, :size]
                for j in range(size):
                    total[j] = total[j] + row[j]
            for j in range(size):
                total[j] = one if total[j] >= zero else -one  # the elected sign
                num[j] = zero
                div[j] = zero
            for m in range(models):
                row, w = c[m, :size], weights[m]
                if consensus:  # only contributions of the elected sign count (a zero one never does)
                    for j in range(size):
                        agree = row[j] * total[j] > zero
                        num[j] += row[j] if agree else zero
                        div[j] += w if agree else zero
                else:
                    for j in range(size):
                        num[j] += row[j]
                        div[j] += w
            if normalize:
                for j in range(size):
                    d = div[j]
                    num[j] = num[j] / (one if (d == zero if consensus else abs(d) < tiny) else d)
            if scale != one:
                for j in range(size):
                    num[j] = num[j] * scale
            for j in range(size):
                out[start + j] = b[j] + num[j]

    return merge


_DELLA: Any = None
