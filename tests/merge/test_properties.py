"""Property tests of the merge methods (hypothesis)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evoopt import merge as M
from evoopt.merge import PreparedTensor, _numba, _prepared, merge_prepared
from tests.helpers.merge import run

sizes = st.integers(min_value=1, max_value=64)
seeds = st.integers(min_value=0, max_value=2**31)
weights = st.floats(min_value=0.05, max_value=2.0)
densities = st.floats(min_value=0.01, max_value=1.0)


def _tensors(seed: int, n: int, count: int, dtype: torch.dtype = torch.float32,
             spread: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` sources, each the base plus normal noise of std ``spread`` (0.01 in a 16-bit dtype: task
    vectors of a few steps of the dtype, their magnitudes heavily tied, as fine-tunes of bfloat16 models are)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    return base.to(dtype), [(base + spread * torch.randn(n, generator=g)).to(dtype) for _ in range(count)]


@given(seed=seeds, n=sizes)
def test_one_model_with_weight_one_returns_it(seed: int, n: int) -> None:
    base, (x,) = _tensors(seed, n, 1)
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
        out = run(name, base, [x], {"weight": [1.0], "density": [1.0]}, name="p")
        torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5, msg=name)


@given(seed=seeds, n=sizes, w=st.lists(weights, min_size=3, max_size=3), d=st.lists(densities, min_size=3, max_size=3))
def test_order_of_models_does_not_matter(seed: int, n: int, w: list[float], d: list[float]) -> None:
    base, xs = _tensors(seed, n, 3)
    order = [2, 0, 1]
    for name in ("linear", "task_arithmetic", "ties", "breadcrumbs"):
        coefs = {"weight": w, "density": d, "gamma": [0.0] * 3}
        permuted = {k: [v[i] for i in order] for k, v in coefs.items()}
        a = run(name, base, xs, coefs)
        b = run(name, base, [xs[i] for i in order], permuted)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@given(seed=seeds, n=sizes, w1=st.lists(weights, min_size=2, max_size=2), w2=st.lists(weights, min_size=2, max_size=2))
def test_task_arithmetic_is_linear_in_weights(seed: int, n: int, w1: list[float], w2: list[float]) -> None:
    base, xs = _tensors(seed, n, 2)
    ta = lambda w: M.task_arithmetic(base, xs, weights=w) - base  # noqa: E731
    summed = ta([a + b for a, b in zip(w1, w2)])
    torch.testing.assert_close(summed, ta(w1) + ta(w2), rtol=1e-4, atol=1e-4)


@given(seed=seeds, n=sizes)
def test_dare_at_density_one_is_task_arithmetic(seed: int, n: int) -> None:
    base, xs = _tensors(seed, n, 2)
    out = M.dare(base, xs, weights=[0.3, 0.6], densities=[1.0, 1.0], consensus=False, seed=seed, name="x")
    torch.testing.assert_close(out, M.task_arithmetic(base, xs, weights=[0.3, 0.6]))


@settings(max_examples=20)
@given(seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_dtype_in_is_dtype_out(seed: int, dtype: torch.dtype) -> None:
    base, xs = _tensors(seed, 8, 2, dtype)
    for name in ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "model_stock"):
        coefs = {"weight": [0.5, 0.5], "density": [0.5, 0.5], "gamma": [0.0, 0.0], "normalize": True}
        assert run(name, base, xs, coefs, name="x").dtype == dtype, name
    assert M.slerp(base, xs[0], t=0.3).dtype == dtype


@settings(max_examples=30)
@given(seed=seeds, n=st.integers(1, 3000), w=st.lists(weights, min_size=3, max_size=3),
       d=st.lists(densities, min_size=3, max_size=3),
       mode=st.sampled_from([("none", False), ("magnitude", True), ("random", True), ("random", False),
                             ("breadcrumbs", False), ("breadcrumbs", True), ("magnitude", False)]),
       normalize=st.booleans(), scale=st.floats(0.1, 2.0))
def test_prepared_fast_path_gives_the_same_bytes(seed: int, n: int, w: list[float], d: list[float],
                                                 mode: tuple[str, bool], normalize: bool, scale: float) -> None:
    base, xs = _tensors(seed, n, 3)
    sparsification, consensus = mode
    kwargs = dict(weights=w, densities=d, gammas=[0.05, 0.0, 0.1], sparsification=sparsification,
                  consensus=consensus, normalize=normalize, scale=scale, seed=seed)
    expected = M.generalized_task_arithmetic(base, xs, name="layer.w", **kwargs)  # type: ignore[arg-type]
    out = torch.empty(n)
    merge_prepared(PreparedTensor.build("layer.w", base, xs, magnitudes=True), out, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("count", [1, 2, 5, _prepared.UNROLLED + 1])
@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_the_kernels_sign_consensus_for_any_number_of_sources(count: int, state: str) -> None:
    """The kernel elects the sign and sums the agreeing terms of every source in one pass, compiled per number of
    sources (a pass per source above UNROLLED): the bytes of the pure function for 1, 2, 5 and 9 sources, with
    negative weights (a sign flipped) and exact zeros in a task vector (which never agree)."""
    dtype = torch.bfloat16 if state == "bfloat16" else torch.float32
    base, xs = _tensors(count, 5_000, count, dtype)
    xs[0][::7] = base[::7]
    w = [(-0.6 if m % 2 else 1.1) for m in range(count)]
    prepared = PreparedTensor.build("layer.w", base, xs, magnitudes=True, keep_dtype=True)
    for sparsification, normalize, scale in [("magnitude", True, 1.0), ("random", True, 0.8), ("none", False, 1.3)]:
        kwargs = dict(weights=w, densities=[0.4] * count, sparsification=sparsification, consensus=True,
                      normalize=normalize, scale=scale, seed=5)
        expected = M.generalized_task_arithmetic(base.float(), [x.float() for x in xs], name="layer.w",
                                                 **kwargs)  # type: ignore[arg-type]
        out = torch.empty(base.numel(), dtype=dtype)
        merge_prepared(prepared, out, **kwargs)  # type: ignore[arg-type]
        assert torch.equal(out, expected.to(dtype)), (sparsification, count)


@pytest.mark.parametrize("state", ["float32", "bfloat16", "streamed"])
def test_more_sources_than_unrolled_merge_source_by_source(monkeypatch: pytest.MonkeyPatch, state: str) -> None:
    """Above UNROLLED sources the kernel takes their parameters as arrays and makes a pass over the entries per
    source, carrying the total and the agreeing sums in memory: the bytes of the pure function in every mode, with
    and without the sign consensus, for sources in memory and streamed."""
    monkeypatch.setattr(_prepared, "UNROLLED", 2)
    dtype = torch.bfloat16 if state == "bfloat16" else torch.float32
    base, xs = _tensors(7, 3_000, 3, dtype)
    xs[1][::5] = base[::5]
    prepared = (PreparedTensor.streamed("layer.w", base, xs, magnitudes=True) if state == "streamed" else
                PreparedTensor.build("layer.w", base, xs, magnitudes=True, keep_dtype=True))
    for sparsification in ("none", "magnitude", "random", "breadcrumbs"):
        for consensus, normalize in [(True, True), (False, True), (True, False), (False, False)]:
            kwargs = dict(weights=[0.9, -0.5, 1.2], densities=[0.4, 0.7, 0.5], gammas=[0.05, 0.0, 0.1],
                          sparsification=sparsification, consensus=consensus, normalize=normalize, scale=0.8, seed=3)
            expected = M.generalized_task_arithmetic(base.float(), [x.float() for x in xs], name="layer.w",
                                                     **kwargs)  # type: ignore[arg-type]
            out = torch.empty(base.numel(), dtype=dtype)
            merge_prepared(prepared, out, **kwargs)  # type: ignore[arg-type]
            assert torch.equal(out, expected.to(dtype)), (sparsification, consensus, normalize)


def test_same_recipe_same_bytes() -> None:
    base, xs = _tensors(0, 500, 2)
    a = M.dare(base, xs, weights=[1.0, 1.0], densities=[0.3, 0.3], consensus=True, seed=11, name="n")
    b = M.dare(base, xs, weights=[1.0, 1.0], densities=[0.3, 0.3], consensus=True, seed=11, name="n")
    assert torch.equal(a, b)


@settings(max_examples=30)
@given(seed=seeds, n=st.integers(1, 3000), w=st.lists(weights, min_size=3, max_size=3),
       d=st.lists(densities, min_size=3, max_size=3), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       mode=st.sampled_from([("none", False), ("magnitude", True), ("random", True), ("breadcrumbs", True)]),
       normalize=st.booleans(), chunk=st.sampled_from([7, 64, 1 << 18]), spread=st.sampled_from([1.0, 0.01]))
def test_stored_dtype_state_gives_the_pure_functions_bytes(seed: int, n: int, w: list[float], d: list[float],
                                                           dtype: torch.dtype, mode: tuple[str, bool],
                                                           normalize: bool, chunk: int, spread: float) -> None:
    """16-bit sources kept as they are (half the state of float32 task vectors), widened chunk by chunk: the
    same bytes as the pure function on the same 16-bit tensors, into a 16-bit and a float32 model; with task
    vectors of a few steps of the dtype too (magnitudes tied at the cuts)."""
    base, xs = _tensors(seed, n, 3, dtype, spread)
    sparsification, consensus = mode
    kwargs = dict(weights=w, densities=d, gammas=[0.05, 0.0, 0.1], sparsification=sparsification,
                  consensus=consensus, normalize=normalize, scale=1.0, seed=seed)
    expected = M.generalized_task_arithmetic(base, xs, name="layer.w", **kwargs)  # type: ignore[arg-type]
    prepared = PreparedTensor.build("layer.w", base, xs, magnitudes=True, keep_dtype=True)
    assert prepared.stored and prepared.deltas.dtype == dtype  # 2 bytes per entry and model
    float32 = PreparedTensor.build("layer.w", base, xs, magnitudes=True)
    assert not float32.stored and np.array_equal(prepared.grid_values, float32.grid_values)
    assert np.array_equal(prepared.grid_indices, float32.grid_indices)
    out, wide, reference = torch.empty(n, dtype=dtype), torch.empty(n), torch.empty(n)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_prepared, "CHUNK", chunk)  # chunks that split the tensor, and one that does not
        merge_prepared(prepared, out, **kwargs)  # type: ignore[arg-type]
        merge_prepared(prepared, wide, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(out, expected)
    merge_prepared(float32, reference, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(wide, reference)


@settings(max_examples=40)
@given(seed=seeds, n=st.integers(2, 3000), w=st.lists(weights, min_size=3, max_size=3),
       d=st.lists(densities, min_size=3, max_size=3),
       state=st.sampled_from(["float32", "bfloat16", "float16", "streamed"]),
       mode=st.sampled_from([("none", False), ("magnitude", True), ("random", True), ("random", False),
                             ("breadcrumbs", True)]),
       normalize=st.booleans(), scale=st.sampled_from([1.0, 0.7]), chunk=st.sampled_from([7, 64, 1 << 22]),
       spread=st.sampled_from([1.0, 0.01]))
def test_the_gpu_paths_torch_merge_gives_the_kernels_bytes(seed: int, n: int, w: list[float], d: list[float],
                                                            state: str, mode: tuple[str, bool], normalize: bool,
                                                            scale: float, chunk: int, spread: float) -> None:
    """The GPU path merges in plain torch operations (no numba); here on CPU tensors, reached through an ``out``
    that is not contiguous: the same bytes as the fused kernel and as the pure function, for each kind of state
    and chunk sizes that split the tensor."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(state, torch.float32)
    base, xs = _tensors(seed, n, 3, dtype, spread)
    sparsification, consensus = mode
    kwargs = dict(weights=w, densities=d, gammas=[0.05, 0.0, 0.1], sparsification=sparsification,
                  consensus=consensus, normalize=normalize, scale=scale, seed=seed)
    expected = M.generalized_task_arithmetic(base, xs, name="layer.w", **kwargs)  # type: ignore[arg-type]
    prepared = (PreparedTensor.streamed("layer.w", base, xs, magnitudes=True) if state == "streamed"
                else PreparedTensor.build("layer.w", base, xs, magnitudes=True, keep_dtype=True))
    kernel = torch.empty(n, dtype=dtype)
    merge_prepared(prepared, kernel, **kwargs)  # type: ignore[arg-type]
    strided = torch.full((2 * n,), 9.0, dtype=dtype)[::2]  # not contiguous (n > 1): the torch path
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_prepared, "TORCH_CHUNK", chunk)
        patch.setattr(_prepared, "_fused_kernel", None)  # the torch path must not reach numba
        merge_prepared(prepared, strided, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(strided, kernel)
    assert torch.equal(strided, expected)


@pytest.mark.parametrize("n", [4096, 40_000])
def test_the_gpu_paths_grid_sorted_by_torch_is_the_same_grid(n: int) -> None:
    """The GPU path sorts each row's magnitudes on its device (``sort_on``: a stable sort, (magnitude, index) order
    itself) where the CPU sorts the magnitudes alone and finds the tied entries' indices in one more pass: here on
    CPU tensors, the same grid for the float32, stored and streamed states, on heavily tied bfloat16 task vectors."""
    base, xs = _tensors(2, n, 3, torch.bfloat16, spread=0.01)
    for build in (lambda **k: PreparedTensor.build("w", base, xs, magnitudes=True, **k),
                  lambda **k: PreparedTensor.build("w", base, xs, magnitudes=True, keep_dtype=True, **k),
                  lambda **k: PreparedTensor.streamed("w", base, xs, magnitudes=True, **k)):
        numpy_sorted, torch_sorted = build(), build(sort_on=torch.device("cpu"))
        assert torch_sorted.grid_values is not None and torch_sorted.grid_indices is not None
        assert np.array_equal(torch_sorted.grid_values, numpy_sorted.grid_values)
        assert np.array_equal(torch_sorted.grid_indices, numpy_sorted.grid_indices)
        assert torch_sorted.grid_indices.dtype == numpy_sorted.grid_indices.dtype
    # out of memory on the device (a large embedding on a small GPU): the CPU's sort, the same grid
    with pytest.MonkeyPatch.context() as patch:
        def short_of_memory(*args: object, **kwargs: object) -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated on CPU tensors)")

        patch.setattr(torch.Tensor, "sort", short_of_memory)
        fallen_back = PreparedTensor.build("w", base, xs, magnitudes=True, sort_on=torch.device("cpu"))
    assert np.array_equal(fallen_back.grid_indices, numpy_sorted.grid_indices)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [4096, 40_000])
def test_a_cut_among_tied_magnitudes_keeps_exactly_its_count(n: int) -> None:
    """bfloat16 task vectors take few distinct magnitudes: keeping every entry tied at the cut kept 0.327 of a 256 x
    256 tensor at density 0.2 (mergekit's topk: 0.200). A cut is a rank in the order of (magnitude, index): the
    window of ranks [lo, hi) is kept exactly, by hand against a stable sort, in the pure function and in the fast
    path (exact below 16,384 entries, the rank rounded to the grid above: within its stride)."""
    from evoopt.merge._pieces import rank_window

    base, xs = _tensors(1, n, 2, torch.bfloat16, spread=0.01)
    delta = xs[0].float() - base.float()
    magnitude = delta.abs()
    assert magnitude.unique().numel() < n // 10  # heavily tied
    order = torch.argsort(magnitude, stable=True)
    prepared = PreparedTensor.build("w", base, xs, magnitudes=True, keep_dtype=True)
    # the grid: each point the entry of a stable sort of the magnitudes (a sort of (magnitude, index))
    stable = np.argsort(magnitude.numpy(), kind="stable")
    ranks = np.unique(np.append(np.arange(0, n, prepared.grid_stride), n - 1))
    assert prepared.grid_values is not None and prepared.grid_indices is not None
    assert np.array_equal(prepared.grid_indices[0], stable[ranks])
    assert np.array_equal(prepared.grid_values[0], magnitude.numpy()[stable[ranks]])
    for density, gamma in ((0.2, 0.0), (0.5, 0.0), (0.3, 0.05), (0.01, 0.0)):
        lo, hi = rank_window(n, density, gamma=gamma)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[lo:hi]] = True
        mask = M.sparsify_mask(delta, density, gamma=gamma)
        assert torch.equal(mask, expected), (density, gamma)
        out = torch.empty(n)
        sparsification = "breadcrumbs" if gamma else "magnitude"
        merge_prepared(prepared, out, weights=[1.0, 0.0], densities=[density, 1.0], gammas=[gamma, 0.0],
                       sparsification=sparsification)
        kept = (out - base.float()) != 0
        if n <= _prepared.GRID_SIZE:
            assert torch.equal(kept, expected & (delta != 0)), (density, gamma)
        else:
            assert abs(int(kept.sum()) - int((expected & (delta != 0)).sum())) <= 2 * prepared.grid_stride
    # SCE's selection: the top share of variances, ties by index alike
    a = M.sce(base, xs, weights=[1.0, 1.0], select_topk=0.3)
    variance = torch.stack([x.float() - base.float() for x in xs]).var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * 0.3)
    assert int(((a.float() - base.float()) != 0).sum()) <= k < int((variance >= variance.flatten().kthvalue(n - k + 1)
                                                                    .values).sum())


@pytest.mark.parametrize("n", [960 * 960, 99_997, 320 * 960])
def test_ties_keeps_each_models_largest_entry_at_any_size(n: int) -> None:
    """The magnitude grid's last point is rank n - 1 (appended after s, 2s, ...): a window reaching the top must
    end there. It ended at the point before where (n - 1) % s < s / 2, and TIES zeroed each model's largest entry
    (SmolLM2-360M's 960 x 960 projections; MiniLM's embedding)."""
    base, xs = _tensors(n, n, 1)
    prepared = PreparedTensor.build("w", base, xs, magnitudes=True)
    out = torch.empty(n)
    merge_prepared(prepared, out, weights=[1.0], densities=[0.5], sparsification="magnitude")
    delta = xs[0] - base
    top = int(delta.abs().argmax())
    assert out[top] - base[top] == pytest.approx(float(delta[top]), abs=1e-6)
    assert prepared.bounds(0, (n - 1, n)) == ((float(delta.abs().max()), top), (math.inf, 0))


def test_a_bfloat16_model_is_written_rounded_as_torch_rounds() -> None:
    """The kernel writes a bfloat16 model itself: round to nearest even, as torch's conversion, at the halfway
    points between neighbours, overflow to infinity, subnormals, signed zeros, infinities and NaN."""
    halfway = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-126 * (1 + 2**-8), 3.3961e38, 3.4e38, -3.4e38,
               math.inf, -math.inf, math.nan]
    values = torch.tensor(halfway + [1e-40, -1e-40, 0.0, -0.0, 1.0, 65504.0, 2**-133] * 5, dtype=torch.float32)
    base = torch.zeros_like(values)
    prepared = PreparedTensor.build("w", base, [values], magnitudes=False)
    out = torch.empty(values.numel(), dtype=torch.bfloat16)
    merge_prepared(prepared, out, weights=[1.0])
    expected, nan = (base + values).to(torch.bfloat16), values.isnan()
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert out[nan].isnan().all()  # (torch's vectorised conversion writes 0xFFFF, its scalar one 0x7FC0)
    assert out[0] == 1.0 and out[1] == 1 + 2**-6 and torch.isinf(out[5])  # ties to even; overflow


@pytest.mark.parametrize("state", ["float32", "bfloat16", "streamed"])
@pytest.mark.parametrize("n", [3 * 8_192 + 17, 5 * 8_192])
def test_the_kernel_over_many_blocks_and_threads_gives_the_same_bytes(state: str, n: int) -> None:
    """Tensors of several of the kernel's blocks, split between its threads in uneven runs (and one thread): the
    random stream's offsets, each worker's scratch and the last partial block give the bytes of the torch path
    (the same magnitude grid) and, where no magnitude cut is rounded to the grid, of the pure function."""
    import numba

    dtype = torch.bfloat16 if state == "bfloat16" else torch.float32
    base, xs = _tensors(n, n, 3, dtype)
    prepared = (PreparedTensor.streamed("layer.w", base, xs, magnitudes=True) if state == "streamed"
                else PreparedTensor.build("layer.w", base, xs, magnitudes=True, keep_dtype=True))
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            for sparsification, consensus in [("magnitude", True), ("random", True), ("none", False)]:
                kwargs = dict(weights=[1.0, 0.7, 0.4], densities=[0.5, 0.3, 0.9], sparsification=sparsification,
                              consensus=consensus, normalize=True, scale=0.9, seed=3)
                out = torch.empty(n, dtype=dtype)
                merge_prepared(prepared, out, **kwargs)  # type: ignore[arg-type]
                strided = torch.empty(2 * n, dtype=dtype)[::2]  # the torch path
                merge_prepared(prepared, strided, **kwargs)  # type: ignore[arg-type]
                assert torch.equal(out, strided), (threads, sparsification)
                if sparsification != "magnitude":
                    pure = M.generalized_task_arithmetic(base, xs, name="layer.w", **kwargs)  # type: ignore[arg-type]
                    assert torch.equal(out, pure), (threads, sparsification)
    finally:
        numba.set_num_threads(before)


def test_the_kernel_keeps_torchs_thread_count() -> None:
    """numba's first launch of its OpenMP pool set the process's OpenMP thread count, which torch reads as its own:
    a worker given one torch thread scored on all cores after its first merge. In a fresh interpreter (the pool
    starts once per process), torch keeps the count it was given."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from evoopt.merge import PreparedTensor, merge_prepared\n"
        "n = 50_000\n"
        "xs = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(3)]\n"
        "prepared = PreparedTensor.build('l.w', xs[0], xs[1:], magnitudes=True, keep_dtype=True)\n"
        "merge_prepared(prepared, torch.empty(n), weights=[1.0, 1.0], densities=[0.5, 0.5], sparsification='magnitude',"
        " consensus=True, normalize=True, scale=1.0, seed=0)\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True,
                          env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    assert done.stdout.split()[-1] == "1", done.stdout + done.stderr


def test_the_kernel_runs_on_at_most_torchs_threads() -> None:
    """A process given one torch thread (a benchmark job, a worker beside others) merges on one numba thread:
    numba's pool on every core waited on the core another process held (0.23 s a candidate became 2.2 s)."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    seen: list[tuple[int, int]] = []
    before, numbas = torch.get_num_threads(), numba.get_num_threads()
    try:
        for torch_threads in [1, 2]:
            torch.set_num_threads(torch_threads)
            _prepared._into(torch.empty(4), lambda target, threads: seen.append((threads, numba.get_num_threads())), ())
    finally:
        torch.set_num_threads(before)
    assert seen == [(1, 1), (min(2, numbas),) * 2]  # the pool itself narrowed: a prange over 1 still woke it all
    assert numba.get_num_threads() == numbas  # and widened again


def test_wide_vectors_are_asked_only_of_an_avx512_cpu() -> None:
    avx512 = {"avx2": True, "avx512f": True, "prefer-256-bit": True, "sse4a": False}
    assert _numba.wide_vector_features(avx512) == "+avx2,+avx512f,-sse4a,-prefer-256-bit"
    assert _numba.wide_vector_features({"avx2": True, "avx512f": False}) is None
    assert _numba.wide_vector_features({"avx2": True}) is None


def test_the_kernel_is_compiled_for_wide_vectors_unless_numba_is_set_by_the_user(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On an AVX-512 CPU numba's target machine drops the 256-bit preference (its loops then 16 float32 lanes wide:
    bfloat16 DARE-TIES 1.4 x faster); numba's CPU settings made by the user are left as they are."""
    import llvmlite.binding as llvm
    from numba.core import config
    from numba.core.registry import cpu_target

    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2")
    _numba._prefer_wide_vectors()
    assert os.environ["NUMBA_CPU_FEATURES"] == "+avx2"  # the user's, kept
    monkeypatch.undo()
    expected = _numba.wide_vector_features(llvm.get_host_cpu_features())
    if expected is None:
        pytest.skip("no AVX-512 here: nothing to widen")
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_ENABLE_AVX") or \
            os.environ.get("NUMBA_CPU_FEATURES", expected) != expected:  # (or set by an earlier kernel here)
        pytest.skip("numba's CPU is set for this run")
    _prepared._fused_kernel()
    assert config.CPU_FEATURES == expected
    assert cpu_target.target_context.codegen()._tm_features == expected  # what compiled the kernel
