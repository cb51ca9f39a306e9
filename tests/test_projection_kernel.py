"""Cost-projection kernel: Triton == torch reference == brute force.

By default the kernel runs under Triton's interpreter on CPU tensors. On a GPU
machine, `SGLANG_EXT_KERNEL_DEVICE=cuda TRITON_INTERPRET=0 pytest
tests/test_projection_kernel.py` runs the same cases with the kernel compiled
on CUDA tensors (the reference and the brute force stay on the CPU)."""
import os

DEVICE = "cuda" if os.environ.get("SGLANG_EXT_KERNEL_DEVICE") == "cuda" else "cpu"
if DEVICE == "cpu":
    # Before anything imports Triton (the kernels are decorated on first use, and
    # Triton reads this then): run them with the interpreter on CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sglang_ext.triton_kernels import (  # noqa: E402
    Projection,
    combine_counts,
    few_counts,
    project_cost,
    project_counts,
    project_cost_reference,
    project_cost_triton,
)


def brute_force(rank, kv, rem, G, H, a=0.0, b=0.0, c=1.0, growth=True):
    """The formula, literally: Python ints for n and S, one float expression per entry."""
    rank, kv, rem = (np.asarray(x).tolist() for x in (rank, kv, rem))
    out = np.empty((H + 1, G), dtype=np.float64)
    for h in range(H + 1):
        for g in range(G):
            n = 0
            S = 0
            for r, k, m in zip(rank, kv, rem):
                if r == g and m > h:
                    n += 1
                    S += k + h if growth else k
            out[h, g] = a + b * n + c * S
    return torch.from_numpy(out)


def random_inputs(rng, N, G, max_kv=4096, max_rem=None, H=10):
    max_rem = max_rem if max_rem is not None else H + 5
    return (
        rng.integers(0, G, N, dtype=np.int64),
        rng.integers(1, max_kv, N, dtype=np.int64),
        rng.integers(0, max_rem + 1, N, dtype=np.int64),
    )


if DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("SGLANG_EXT_KERNEL_DEVICE=cuda, but torch sees no CUDA device")


def on_device(*xs):
    """Inputs for the Triton kernel: CPU tensors for the interpreter, or CUDA tensors."""
    return [torch.as_tensor(np.asarray(x)).to(DEVICE) for x in xs]


def triton_cost(rank, kv, rem, G, H, **kw):
    """The Triton kernel's projection (interpreted, or compiled on the GPU), on the CPU."""
    return project_cost_triton(*on_device(rank, kv, rem), G, H, **kw).cpu()


def exact(actual, expected):
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def both(rank, kv, rem, G, H, **kw):
    """Reference and Triton results, asserted identical; returns the reference."""
    ref = project_cost_reference(rank, kv, rem, G, H, **kw)
    tri = triton_cost(rank, kv, rem, G, H, **kw)
    assert ref.shape == (H + 1, G)
    exact(tri, ref)
    return ref


# ------------------------------------------------------------------- random


@pytest.mark.parametrize("growth", [True, False])
@pytest.mark.parametrize("G,N,H", [(1, 37, 7), (4, 200, 20), (8, 300, 80), (16, 5, 3), (33, 257, 70), (5, 2100, 10)])
def test_random_kernel_matches_reference(G, N, H, growth):
    rng = np.random.default_rng(1000 * G + N + H + growth)
    rank, kv, rem = random_inputs(rng, N, G, H=H, max_rem=H + H // 2)
    a, b, c = rng.uniform(-1, 1, 3).tolist()
    both(rank, kv, rem, G, H, a=a, b=b, c=c, growth=growth)
    both(rank, kv, rem, G, H, growth=growth)  # default weights (0, 0, 1)


@pytest.mark.parametrize("growth", [True, False])
@pytest.mark.parametrize("G,N,H", [(1, 20, 5), (3, 40, 12), (6, 60, 0), (5, 50, 30), (9, 4, 10), (40, 7, 0)])
def test_reference_matches_brute_force(G, N, H, growth):
    rng = np.random.default_rng(7 * G + N + H + growth)
    rank, kv, rem = random_inputs(rng, N, G, H=H, max_rem=H + 3)
    a, b, c = rng.uniform(-2, 2, 3).tolist()
    for w in (dict(a=a, b=b, c=c), dict(), dict(a=0.0, b=0.0, c=1.0), dict(a=1e-3, b=5e-5, c=7.5e-8)):
        ref = project_cost_reference(rank, kv, rem, G, H, growth=growth, **w)
        exact(ref, brute_force(rank, kv, rem, G, H, growth=growth, **w))


@pytest.mark.parametrize("growth", [True, False])
@pytest.mark.parametrize("G,N,H,P", [(1, 30, 7, 3), (4, 200, 300, 12), (32, 500, 2000, 26), (7, 0, 50, 5), (3, 40, 9, 10),
                                     (64, 10, 300, 9)])
def test_steps_are_the_dense_rows(G, N, H, P, growth):
    # A long horizon projected at a few steps: row k is exactly dense row steps[k],
    # on both backends (the Triton suffix kernel reads the steps for growth).
    rng = np.random.default_rng(11 * G + N + H + P + growth)
    rank, kv, rem = random_inputs(rng, N, G, H=H, max_rem=H + H // 3)
    steps = np.sort(rng.choice(H + 1, size=P, replace=False))
    a, b, c = rng.uniform(-1, 1, 3).tolist()
    for w in (dict(a=a, b=b, c=c), dict()):
        dense = project_cost_reference(rank, kv, rem, G, H, growth=growth, **w)
        ref = project_cost_reference(rank, kv, rem, G, steps, growth=growth, **w)
        assert ref.shape == (P, G)
        exact(ref, dense[torch.from_numpy(steps)])
        exact(triton_cost(rank, kv, rem, G, steps, growth=growth, **w), ref)
        exact(project_cost(rank, kv, rem, G, torch.from_numpy(steps), growth=growth, **w).cost, ref)


def test_steps_edges():
    rank, kv, rem = np.array([0, 1, 1]), np.array([10, 20, 30]), np.array([0, 5, 1000])
    # a step past every request: only the long one is left, grown by that step
    got = project_cost_reference(rank, kv, rem, 2, [0, 4, 5, 999, 1000])
    assert got.tolist() == [[0.0, 50.0], [0.0, 58.0], [0.0, 35.0], [0.0, 1029.0], [0.0, 0.0]]
    exact(triton_cost(rank, kv, rem, 2, [0, 4, 5, 999, 1000]), got)
    # one step
    exact(project_cost_reference(rank, kv, rem, 2, [3]), project_cost_reference(rank, kv, rem, 2, 3)[3:])
    for bad in ([], [3, 3], [5, 2], [-1, 2], [[1, 2]], [0.5, 1.5]):
        with pytest.raises((ValueError, TypeError), match="horizon"):
            project_cost(rank, kv, rem, 2, bad)


def test_paper_projection_is_kv_still_held():
    # growth=False, (a, b, c) = (0, 0, 1): KV tokens each rank still holds h steps ahead.
    rank, kv, rem = [0, 0, 1], [100, 50, 7], [2, 1, 3]
    expected = torch.tensor([[150.0, 7.0], [100.0, 7.0], [0.0, 7.0], [0.0, 0.0]], dtype=torch.float64)
    exact(both(rank, kv, rem, 2, 3, growth=False), expected)
    grown = torch.tensor([[150.0, 7.0], [101.0, 8.0], [0.0, 9.0], [0.0, 0.0]], dtype=torch.float64)
    exact(both(rank, kv, rem, 2, 3, growth=True), grown)


# ------------------------------------------------------------------- edges


@pytest.mark.parametrize("growth", [True, False])
def test_no_requests_every_entry_is_a(growth):
    e = np.zeros(0, dtype=np.int64)
    for G, H in [(4, 6), (1, 0)]:
        out = both(e, e, e, G, H, a=0.25, b=3.0, c=2.0, growth=growth)
        exact(out, torch.full((H + 1, G), 0.25, dtype=torch.float64))
    # an empty Python list comes in as float32; with no elements that is accepted
    exact(project_cost_reference([], [], [], 2, 1, a=1.0), torch.ones((2, 2), dtype=torch.float64))


@pytest.mark.parametrize("growth", [True, False])
def test_empty_ranks_get_a(growth):
    rng = np.random.default_rng(3)
    G, H, N = 7, 9, 120
    rank = rng.choice([1, 4], N).astype(np.int64)  # ranks 0, 2, 3, 5, 6 empty
    kv = rng.integers(1, 1000, N, dtype=np.int64)
    rem = rng.integers(0, 15, N, dtype=np.int64)
    out = both(rank, kv, rem, G, H, a=0.5, b=0.1, c=0.01, growth=growth)
    exact(out, brute_force(rank, kv, rem, G, H, 0.5, 0.1, 0.01, growth))
    for g in (0, 2, 3, 5, 6):
        assert (out[:, g] == 0.5).all()


@pytest.mark.parametrize("growth", [True, False])
def test_horizon_zero(growth):
    rng = np.random.default_rng(4)
    rank, kv, rem = random_inputs(rng, 90, 5, max_rem=3)
    out = both(rank, kv, rem, 5, 0, a=1.0, b=2.0, c=3.0, growth=growth)
    assert out.shape == (1, 5)
    exact(out, brute_force(rank, kv, rem, 5, 0, 1.0, 2.0, 3.0, growth))


@pytest.mark.parametrize("growth", [True, False])
def test_kv_near_int32_limit_is_exact(growth):
    G, H = 3, 6
    big = 2**31 - 5
    rank = np.array([0] * 8 + [2] * 5, dtype=np.int64)
    kv = np.array([big] * 8 + [big - 1] * 5, dtype=np.int64)
    rem = np.array([7, 7, 7, 6, 5, 3, 1, 1, 7, 4, 4, 2, 0], dtype=np.int64)
    # c=1, a=b=0: every entry is an integer below 2**53, so float64 is exact
    out = both(rank, kv, rem, G, H, growth=growth)
    assert out[0, 0].item() == 8 * big  # > 2**34: int32 accumulation would wrap
    assert out[0, 2].item() == 4 * (big - 1)  # the rem=0 request never counts
    exact(out, brute_force(rank, kv, rem, G, H, growth=growth))
    # and with non-trivial weights the two backends still agree bit for bit
    both(rank, kv, rem, G, H, a=0.1, b=0.2, c=1e-7, growth=growth)
    exact(project_cost_reference(rank, kv, rem, G, H, a=0.1, b=0.2, c=1e-7, growth=growth),
          brute_force(rank, kv, rem, G, H, 0.1, 0.2, 1e-7, growth))


def test_many_large_requests_int64_accumulation():
    # 300 requests of ~2**31 KV on one rank: sums ~ 2**39, exact in int64 and float64.
    n = 300
    rank = np.zeros(n, dtype=np.int64)
    kv = np.full(n, 2**31 - 5, dtype=np.int64) - np.arange(n)
    rem = np.arange(n, dtype=np.int64) % 9
    out = both(rank, kv, rem, 1, 8, growth=True)
    exact(out, brute_force(rank, kv, rem, 1, 8, growth=True))


@pytest.mark.parametrize("growth", [True, False])
def test_single_rank(growth):
    rng = np.random.default_rng(5)
    rank, kv, rem = random_inputs(rng, 64, 1, H=12)
    out = both(rank, kv, rem, 1, 12, a=0.3, b=0.7, c=0.11, growth=growth)
    exact(out, brute_force(rank, kv, rem, 1, 12, 0.3, 0.7, 0.11, growth))


def test_remaining_zero_never_active():
    rank = np.array([0, 1, 1, 2], dtype=np.int64)
    kv = np.array([10, 20, 30, 40], dtype=np.int64)
    rem = np.zeros(4, dtype=np.int64)
    for growth in (True, False):
        exact(both(rank, kv, rem, 3, 4, a=2.0, b=1.0, c=1.0, growth=growth),
              torch.full((5, 3), 2.0, dtype=torch.float64))
    # mixed: only the rem>0 request counts, for h < rem
    rem = np.array([0, 2, 0, 0], dtype=np.int64)
    out = both(rank, kv, rem, 3, 4, growth=False)
    expected = torch.zeros((5, 3), dtype=torch.float64)
    expected[:2, 1] = 20.0
    exact(out, expected)


def test_remaining_beyond_horizon_and_negative_clipped():
    rank = np.array([0, 0, 1], dtype=np.int64)
    kv = np.array([5, 6, 7], dtype=np.int64)
    rem = np.array([10**12, -3, 2], dtype=np.int64)  # far beyond H; negative: never active
    out = both(rank, kv, rem, 2, 3, growth=True)
    exact(out, brute_force(rank, kv, rem, 2, 3, growth=True))


# ------------------------------------------------------------------- API


def test_out_of_range_rank_raises():
    kv = np.array([1, 2, 3], dtype=np.int64)
    rem = np.array([1, 1, 1], dtype=np.int64)
    for bad in ([0, 3, 1], [0, -1, 1]):
        rank = np.array(bad, dtype=np.int64)
        for backend in ("auto", "torch", "triton"):
            with pytest.raises(ValueError, match="rank"):
                project_cost(rank, kv, rem, 3, 4, backend=backend)
        with pytest.raises(ValueError):
            project_cost_reference(rank, kv, rem, 3, 4)
        with pytest.raises(ValueError):
            project_cost_triton(*on_device(rank, kv, rem), 3, 4)


def test_bad_arguments_raise():
    x = np.array([0, 1], dtype=np.int64)
    with pytest.raises(ValueError, match="backend"):
        project_cost(x, x, x, 2, 3, backend="cuda")
    with pytest.raises(ValueError):
        project_cost(x, x, x[:1], 2, 3)  # length mismatch
    with pytest.raises(ValueError):
        project_cost(x, x, x, 2, -1)  # negative horizon
    with pytest.raises(TypeError):
        project_cost(x, x.astype(np.float64), x, 2, 3)  # float KV lengths


def test_project_cost_backends_and_inputs():
    rng = np.random.default_rng(6)
    rank, kv, rem = random_inputs(rng, 50, 4, H=8)
    kw = dict(a=0.1, b=0.2, c=0.3, growth=True)
    ref = project_cost_reference(rank, kv, rem, 4, 8, **kw)

    auto = project_cost(rank, kv, rem, 4, 8, **kw)  # CPU inputs: torch reference
    assert isinstance(auto, Projection) and auto.backend == "torch"
    exact(auto.cost, ref)

    tri = project_cost(*on_device(rank, kv, rem), 4, 8, backend="triton", **kw)  # interpreter, or compiled
    assert tri.backend == "triton"
    exact(tri.cost.cpu(), ref)
    if DEVICE == "cuda":  # CUDA inputs: auto picks the compiled kernel
        auto = project_cost(*on_device(rank, kv, rem), 4, 8, **kw)
        assert auto.backend == "triton"
        exact(auto.cost.cpu(), ref)

    # torch tensors (int32 ranks / remaining too) give the same result
    tt = project_cost(torch.from_numpy(rank).to(torch.int32), torch.from_numpy(kv),
                      torch.from_numpy(rem).to(torch.int32), 4, 8, backend="torch", **kw)
    assert tt.backend == "torch"
    exact(tt.cost, ref)
    assert tt.cost.shape == (9, 4) and tt.cost.dtype == torch.float64


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("growth", [True, False])
def test_counts_of_two_parts_add_up_to_the_projection_of_both(backend, growth):
    # A caller keeps the counts of requests that stay and adds a few new ones': the
    # combined cost must be project_cost's for all of them, to the last bit.
    rng = np.random.default_rng(4)
    for horizon in (12, np.array([0, 1, 3, 7, 20, 60])):
        rank, kv, rem = random_inputs(rng, 300, 7, H=30)
        for split in (0, 1, 150, 300):
            a, b, c = 0.3, 0.7, 1e-3
            part = on_device if backend == "triton" else (lambda *xs: xs)
            kept = project_counts(*part(rank[split:], kv[split:], rem[split:]), 7, horizon, growth, backend)
            new = project_counts(*part(rank[:split], kv[:split], rem[:split]), 7, horizon, growth, backend)
            assert kept[2] == new[2] == backend
            cost = combine_counts(kept[0] + new[0], kept[1] + new[1], a, b, c).cpu()
            exact(cost, project_cost(*part(rank, kv, rem), 7, horizon, a, b, c, growth, backend).cost.cpu())


@pytest.mark.parametrize("growth", [True, False])
@pytest.mark.parametrize("G,N,horizon", [(256, 8, 200), (7, 40, 12), (3, 1, 0), (9, 5, np.array([0, 2, 5, 40, 300])),
                                         (1, 30, 7), (50, 0, 10)])
def test_few_counts_are_the_reference_counts_at_their_ranks(G, N, horizon, growth):
    # The numpy counts of a few requests, at their ranks' columns: the torch
    # reference's at those columns, and every other column of it 0. Remaining steps
    # of 0, negative, and past the horizon included.
    rng = np.random.default_rng(N + G)
    rank, kv, _ = random_inputs(rng, N, G)
    rem = rng.integers(-3, 320, N, dtype=np.int64)
    cols, cnt, kvs = few_counts(rank, kv, rem, horizon, growth)
    ref_cnt, ref_kvs, _ = project_counts(rank, kv, rem, G, horizon, growth, "torch")
    assert cols.tolist() == sorted(set(rank.tolist())) and cnt.dtype == kvs.dtype == np.int64
    assert np.array_equal(cnt, ref_cnt.numpy()[:, cols]) and np.array_equal(kvs, ref_kvs.numpy()[:, cols])
    others = np.setdiff1d(np.arange(G), cols)
    assert not ref_cnt.numpy()[:, others].any() and not ref_kvs.numpy()[:, others].any()


@pytest.mark.parametrize("abc", [(0.0, 0.0, 1.0), (0.3, 0.7, 1e-3), (0.0, 1.0, 0.25), (1.5, 0.0, 3.0)])
def test_numpy_combination_is_the_kernel_combination(abc):
    rng = np.random.default_rng(11)
    cnt = torch.from_numpy(rng.integers(0, 300, (21, 9)))
    kvs = torch.from_numpy(rng.integers(0, 2**40, (21, 9)))
    got = combine_counts(cnt.numpy(), kvs.numpy(), *abc)
    exact(torch.from_numpy(got), combine_counts(cnt, kvs, *abc))


def test_package_import_does_not_need_triton():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # makes `import triton` fail\n"
        "import numpy as np\n"
        "import sglang_ext.triton_kernels as tk\n"
        "x = np.array([0, 1])\n"
        "assert tk.project_cost(x, x, x, 2, 2).backend == 'torch'\n"
        "try:\n"
        "    tk.project_cost(x, x, x, 2, 2, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e).lower(), e\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
