"""numba pieces of the fused merge kernel (:mod:`evoopt.merge._prepared`): the CPU target's vector width and the
random stream's draws in 32-bit arithmetic. numba itself is imported (and the functions compiled) on first use."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from typing import Any

from evoopt.merge._pieces import _FMIX1, _FMIX2

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
