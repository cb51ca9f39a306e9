"""Future per-rank decode cost projection: a plain-torch reference and a Triton kernel.

For running requests i (rank r_i in [0, G), KV length kv_i, predicted remaining
decode steps m_i >= 0) and horizon H, the projected cost of rank g at step
h = 0..H is

    cost[h, g] = a + b * n(h, g) + c * S(h, g)

    n(h, g) = #{ i : r_i == g and m_i > h }                      (active requests)
    S(h, g) = sum_{i : r_i == g and m_i > h} (kv_i + h)           growth=True
            = sum_{i : r_i == g and m_i > h}  kv_i                growth=False

i.e. the cost model of `sglang_ext.cost.CostModel` (t = a + b*n + c*kv) applied
to the load each rank will still carry h steps from now. `a` is added even on a
rank with no request. The paper's projection is growth=False, (a, b, c) = (0, 0, 1):
the KV tokens each rank still holds h steps ahead.

`horizon` may also be the steps themselves, an increasing sequence h_0 < h_1 <
... of non-negative ints: then row k is step h_k (a long lookahead evaluated at
a few steps costs O(steps), not O(H)).

Both implementations accumulate n and S in int64 (exact for KV lengths near 2**31
and many requests) and convert to float64 only in the final combination, which
they share (`_combine`), so the two backends agree bit for bit.

Triton is imported lazily (first use of the Triton backend), so importing this
module never needs it; the kernels are decorated at that point, which is also
when Triton reads TRITON_INTERPRET (set it before the first Triton call to run
the kernels on CPU tensors with the interpreter).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Projection", "combine_counts", "few_counts", "project_cost",
           "project_cost_reference", "project_cost_triton", "project_counts"]

logger = logging.getLogger(__name__)

_BACKENDS = ("auto", "torch", "triton")
_logged_choices: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Projection:
    """Result of `project_cost`: cost[h, g] (float64, shape (H+1, G)) and the backend used."""

    cost: torch.Tensor
    backend: str  # "triton" or "torch"


# --------------------------------------------------------------------------- inputs


def _as_int_tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)  # zero-copy for numpy arrays and tensors
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    return t if t.dtype == torch.int64 else t.to(torch.int64)


def _steps(horizon):
    """(H, steps): an int horizon H means steps 0..H (steps None); a 1-D increasing
    sequence of non-negative ints is the steps themselves (H = their count - 1)."""
    if isinstance(horizon, (int, np.integer)) and not isinstance(horizon, bool):
        H = int(horizon)
        if H < 0:
            raise ValueError(f"horizon must be >= 0, got {H}")
        return H, None
    try:
        steps = _as_int_tensor(horizon, "horizon steps")
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"horizon must be an int or a 1-D sequence of steps, got {horizon!r}") from None
    if steps.numel() == 0:
        raise ValueError("horizon steps must not be empty")
    if int(steps[0]) < 0 or (steps.numel() > 1 and not bool((steps[1:] > steps[:-1]).all())):
        raise ValueError("horizon steps must be non-negative and strictly increasing")
    return steps.numel() - 1, steps


def _prepare(req_rank, req_kv, req_remaining, num_ranks, horizon):
    """Validated int64 1-D tensors on one device, G, and the horizon as
    (H, steps): H + 1 output rows, steps None for 0..H or the int64 steps."""
    try:
        G = int(num_ranks)
    except (TypeError, ValueError):
        raise ValueError(f"num_ranks must be an integer, got {num_ranks!r}") from None
    if G < 0:
        raise ValueError(f"num_ranks must be >= 0, got {G}")
    H, steps = _steps(horizon)
    rank = _as_int_tensor(req_rank, "req_rank")
    kv = _as_int_tensor(req_kv, "req_kv")
    rem = _as_int_tensor(req_remaining, "req_remaining")
    n = rank.shape[0]
    if kv.shape[0] != n or rem.shape[0] != n:
        raise ValueError(
            f"req_rank, req_kv, req_remaining must have one length, got {n}, {kv.shape[0]}, {rem.shape[0]}"
        )
    if not (rank.device == kv.device == rem.device):
        raise ValueError(f"inputs are on different devices: {rank.device}, {kv.device}, {rem.device}")
    if n:
        # One vectorised pass (and a single host sync on CUDA).
        bounds = torch.aminmax(rank)
        lo, hi = torch.stack(bounds).tolist() if rank.is_cuda else (bounds[0].item(), bounds[1].item())
        if lo < 0 or hi >= G:
            bad = int(((rank < 0) | (rank >= G)).sum())
            raise ValueError(f"{bad} request(s) have a rank outside [0, {G}) (min {lo}, max {hi})")
    if steps is not None:
        steps = steps.to(rank.device)
    return rank, kv, rem, G, (H, steps)


def _combine(cnt, kvsum, a: float, b: float, c: float):
    """cost = a + b*n + c*S in float64 from exact int64 n, S, evaluated as the
    scalar expression is, (a + b*n) + c*S, with separate (unfused) ops so each
    entry rounds exactly like it. Terms that are exact no-ops are skipped
    (c == 1, b == 1, a == b == 0): same values, fewer passes. Torch tensors or
    numpy arrays (the same operations either way, so the same values)."""
    a, b, c = float(a), float(b), float(c)
    f64 = (lambda x: x.to(torch.float64)) if isinstance(kvsum, torch.Tensor) else (lambda x: x.astype(np.float64))
    cs = f64(kvsum)
    if c != 1.0:
        cs *= c
    if a == 0.0 and b == 0.0:
        return cs
    cost = f64(cnt)
    if b != 1.0:
        cost *= b
    if a != 0.0:
        cost += a
    cost += cs
    return cost


# --------------------------------------------------------------------------- torch


def _end_rows(rem, steps):
    """Per request, how many of the steps it is active at (steps[k] < rem)."""
    return torch.searchsorted(steps, rem, right=False)


def _counts_torch(rank, kv, rem, G: int, H: int, growth: bool, steps=None):
    R = H + 1
    # Equals the O((H+1) * N) formula (used as it is for fewer requests than ranks)
    #     active = rem[None, :] > arange(H+1)[:, None]                  # (H+1, N)
    #     n[h, g] = (active & (rank == g)).sum(1)
    #     S[h, g] = ((kv + h * growth) * (active & (rank == g))).sum(1)
    # computed in O(N + G*H): request i is active exactly at h < e_i, with
    # e_i = clamp(rem_i, 0, H+1). Bucket it by (e_i, rank_i), B[e, g]; then
    # n[h] = sum_{e > h} B[e] (a reverse cumulative sum), taken as total - prefix
    # P[h] = sum_{e <= h} B[e] (row e=0, never active, falls out). Growth adds h
    # per active request, i.e. h * n. All int64, so exact.
    # With explicit steps h_k, row k is step h_k: request i is active at rows
    # k < e_i = #{k : h_k < rem_i}, and growth adds h_k per active request.
    if rank.numel() < G:
        # Fewer requests than ranks (a few sent since the last report): the formula
        # itself, O((H+1) * N), beats the O(G*H) sums. The same int64 counts.
        h = torch.arange(R, dtype=torch.int64, device=kv.device) if steps is None else steps
        active = (h.unsqueeze(1) < rem.unsqueeze(0)).to(torch.int64)  # (R, N)
        cnt = torch.zeros((R, G), dtype=torch.int64, device=kv.device).index_add_(1, rank, active)
        load = kv.unsqueeze(0) + h.unsqueeze(1) if growth else kv.unsqueeze(0).expand(R, -1)
        kvs = torch.zeros((R, G), dtype=torch.int64, device=kv.device).index_add_(1, rank, active * load)
        return cnt, kvs
    end = rem.clamp(0, R) if steps is None else _end_rows(rem, steps)
    flat = torch.add(rank, end, alpha=G)  # e_i * G + rank_i, in [0, (H+2)*G)
    nb = (R + 1) * G
    pc = torch.bincount(flat, minlength=nb).view(R + 1, G).cumsum(0)
    ps = torch.zeros(nb, dtype=torch.int64, device=kv.device).scatter_add_(0, flat, kv)
    ps = ps.view(R + 1, G).cumsum(0)
    cnt = pc[R] - pc[:R]
    kvs = ps[R] - ps[:R]
    if growth:
        h = torch.arange(R, dtype=torch.int64, device=kvs.device) if steps is None else steps
        kvs.addcmul_(h.unsqueeze(1), cnt)
    return cnt, kvs


def _reference_counts(rank, kv, rem, G, hs, growth) -> tuple[torch.Tensor, torch.Tensor]:
    H, steps = hs
    if G == 0 or rank.numel() == 0:
        z = torch.zeros((H + 1, G), dtype=torch.int64, device=rank.device)
        return z, z.clone()
    return _counts_torch(rank, kv, rem, G, H, growth, steps)


def _reference(rank, kv, rem, G, hs, a, b, c, growth) -> torch.Tensor:
    return _combine(*_reference_counts(rank, kv, rem, G, hs, growth), a, b, c)


def project_cost_reference(
    req_rank,
    req_kv,
    req_remaining,
    num_ranks: int,
    horizon: int,
    a: float = 0.0,
    b: float = 0.0,
    c: float = 1.0,
    growth: bool = True,
) -> torch.Tensor:
    """Plain-torch projection (any device): float64 tensor cost[h, g] of shape (H+1, G)
    (horizon: H, or the steps to project at; see the module docstring)."""
    rank, kv, rem, G, hs = _prepare(req_rank, req_kv, req_remaining, num_ranks, horizon)
    return _reference(rank, kv, rem, G, hs, a, b, c, bool(growth))


# --------------------------------------------------------------------------- numpy, a few requests


def few_counts(req_rank: np.ndarray, req_kv: np.ndarray, req_remaining: np.ndarray, horizon,
               growth: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`project_counts`' n and S of a few requests, in numpy, at the columns of the
    ranks they are on only: (ranks, n, S) with `ranks` the distinct ranks, sorted,
    and n, S of shape (H+1, len(ranks)), column j for rank ranks[j] (every other
    column of the full counts is 0). For the requests sent since a rank's last
    report, added to counts kept for the rest: a torch call costs tens of us a
    tensor op on a CPU, and with a few requests on a few of G ranks the formula
    itself, O((H+1) * N) with a column sum per rank, costs a few us. The same
    int64 sums as `_counts_torch`: bit for bit the same counts. 1-D int64 arrays
    in (numpy only, no validation: the caller's own requests); `horizon` as in
    `project_counts`."""
    rank = np.asarray(req_rank, dtype=np.int64)
    rem = np.asarray(req_remaining, dtype=np.int64)
    kv = np.asarray(req_kv, dtype=np.int64)
    h = np.arange(int(horizon) + 1, dtype=np.int64) if np.isscalar(horizon) else np.asarray(horizon, np.int64)
    if not rank.size:
        return rank, np.zeros((h.size, 0), np.int64), np.zeros((h.size, 0), np.int64)
    order = np.argsort(rank, kind="stable")
    rank = rank[order]
    starts = np.flatnonzero(np.concatenate([[True], rank[1:] != rank[:-1]]))  # each rank's first column
    active = h[:, None] < rem[order][None, :]  # (H+1, N)
    load = kv[order][None, :] + h[:, None] if growth else np.broadcast_to(kv[order], active.shape)
    cnt = np.add.reduceat(active.astype(np.int64), starts, axis=1)
    kvs = np.add.reduceat(np.where(active, load, 0), starts, axis=1)
    return rank[starts], cnt, kvs


# --------------------------------------------------------------------------- triton

triton = None  # set by _load_triton(); the kernel bodies resolve `tl` from module globals
tl = None
_triton_error: BaseException | None = None
_kernel_cache: dict[bool, tuple] = {}


def _load_triton() -> None:
    global triton, tl, _triton_error
    if triton is not None:
        return
    if _triton_error is not None:
        raise RuntimeError(f"the Triton backend is unavailable: import triton failed: {_triton_error!r}")
    try:
        import triton as _triton
        import triton.language as _tl
    except Exception as exc:  # ImportError, or a broken install failing at import
        _triton_error = exc
        raise RuntimeError(f"the Triton backend is unavailable: import triton failed: {exc!r}") from exc
    triton, tl = _triton, _tl


def _interpreting() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _bucket_kernel(rank_ptr, kv_ptr, rem_ptr, cnt_ptr, kvs_ptr, N, G, H, BLOCK_N: tl.constexpr):
    # One program per BLOCK_N requests: request i (e_i = min(rem_i, H+1) > 0) adds
    # 1 and kv_i to bucket [e_i - 1, rank_i] of the (H+1, G) int64 buffers.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs < N
    rem = tl.load(rem_ptr + offs, mask=in_range, other=0)
    e = tl.minimum(rem, H + 1)
    active = in_range & (e > 0)
    r = tl.load(rank_ptr + offs, mask=active, other=0)
    kv = tl.load(kv_ptr + offs, mask=active, other=0)
    idx = (e - 1) * G + r
    ones = tl.full([BLOCK_N], 1, tl.int64)
    tl.atomic_add(cnt_ptr + idx, ones, mask=active, sem="relaxed")
    tl.atomic_add(kvs_ptr + idx, kv, mask=active, sem="relaxed")


def _suffix_kernel(cnt_ptr, kvs_ptr, steps_ptr, G, H, num_h_blocks, GROWTH: tl.constexpr,
                   STEPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr):
    # One program per BLOCK_G ranks, in place: bucket row h becomes the sum of rows
    # h..H (active count / KV sum at step h); walks h-tiles from the top with a carry.
    # With STEPS, row k stands for step steps[k] (growth adds that step, not k).
    pid = tl.program_id(0)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < G
    carry_c = tl.zeros([BLOCK_G], dtype=tl.int64)
    carry_s = tl.zeros([BLOCK_G], dtype=tl.int64)
    for i in range(0, num_h_blocks):
        rows = ((num_h_blocks - 1 - i) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (rows[:, None] <= H) & g_ok[None, :]
        off = rows[:, None] * G + g[None, :]
        tc = tl.load(cnt_ptr + off, mask=mask, other=0)
        ts = tl.load(kvs_ptr + off, mask=mask, other=0)
        sc = tl.cumsum(tc, axis=0, reverse=True) + carry_c[None, :]
        ss = tl.cumsum(ts, axis=0, reverse=True) + carry_s[None, :]
        carry_c += tl.sum(tc, axis=0)
        carry_s += tl.sum(ts, axis=0)
        if GROWTH:
            if STEPS:
                h = tl.load(steps_ptr + rows, mask=rows <= H, other=0)
                ss = ss + h[:, None] * sc
            else:
                ss = ss + rows[:, None] * sc
        tl.store(cnt_ptr + off, sc, mask=mask)
        tl.store(kvs_ptr + off, ss, mask=mask)


def _kernels():
    """(bucket, suffix) JIT kernels for the current TRITON_INTERPRET mode (decorated lazily)."""
    _load_triton()
    mode = _interpreting()
    if mode not in _kernel_cache:
        _kernel_cache[mode] = (triton.jit(_bucket_kernel), triton.jit(_suffix_kernel))
    return mode, _kernel_cache[mode]


# Integer-only kernels: FP fusion is moot; passing it explicitly silences Triton 3.9's
# warning about its changing default.
_LAUNCH = dict(num_warps=4, enable_fp_fusion=False)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _triton_impl(rank, kv, rem, G, hs, a, b, c, growth) -> torch.Tensor:
    return _combine(*_triton_counts(rank, kv, rem, G, hs, growth), a, b, c)


def _triton_counts(rank, kv, rem, G, hs, growth) -> tuple[torch.Tensor, torch.Tensor]:
    H, steps = hs
    interpret, (bucket_kernel, suffix_kernel) = _kernels()
    if rank.is_cuda and interpret:
        raise RuntimeError("TRITON_INTERPRET is set: the Triton backend runs on CPU tensors only")
    if not rank.is_cuda and not interpret:
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors (got {rank.device}); "
            "set TRITON_INTERPRET=1 before the first Triton call to run it on CPU with the interpreter"
        )
    n = rank.numel()
    cnt = torch.zeros((H + 1, G), dtype=torch.int64, device=rank.device)
    kvs = torch.zeros((H + 1, G), dtype=torch.int64, device=rank.device)
    if n and G:
        if steps is not None:
            # The bucket kernel takes each request's end row (min(rem, H+1) is
            # then the row count itself); the suffix kernel reads the steps.
            rem = _end_rows(rem, steps)
        rank, kv, rem = rank.contiguous(), kv.contiguous(), rem.contiguous()
        block_n = 1024
        block_h = min(64, max(16, _next_pow2(H + 1)))
        block_g = min(32, max(16, _next_pow2(G)))
        # Triton launches on the current CUDA device: make it the inputs' one.
        with torch.cuda.device(rank.device) if rank.is_cuda else contextlib.nullcontext():
            bucket_kernel[(triton.cdiv(n, block_n),)](
                rank, kv, rem, cnt, kvs, n, G, H, BLOCK_N=block_n, **_LAUNCH,
            )
            suffix_kernel[(triton.cdiv(G, block_g),)](
                cnt, kvs, cnt if steps is None else steps.contiguous(), G, H, triton.cdiv(H + 1, block_h),
                GROWTH=bool(growth), STEPS=steps is not None, BLOCK_H=block_h, BLOCK_G=block_g, **_LAUNCH,
            )
    return cnt, kvs


def project_cost_triton(
    req_rank,
    req_kv,
    req_remaining,
    num_ranks: int,
    horizon: int,
    a: float = 0.0,
    b: float = 0.0,
    c: float = 1.0,
    growth: bool = True,
) -> torch.Tensor:
    """Triton projection: CUDA tensors compiled, or CPU tensors under TRITON_INTERPRET=1.

    Two launches: a scatter of requests into (end step, rank) int64 buckets with
    atomics (O(N)), then an in-place reverse cumulative sum over the horizon per
    rank (O(G*H)). Returns the same float64 (H+1, G) tensor as the reference
    (horizon: H, or the steps to project at).
    """
    rank, kv, rem, G, hs = _prepare(req_rank, req_kv, req_remaining, num_ranks, horizon)
    return _triton_impl(rank, kv, rem, G, hs, a, b, c, bool(growth))


# --------------------------------------------------------------------------- public


def _log_choice(backend: str, why: str) -> None:
    key = (backend, why)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.debug("cost projection backend: %s (%s)", backend, why)


def project_cost(
    req_rank,
    req_kv,
    req_remaining,
    num_ranks: int,
    horizon: int,
    a: float = 0.0,
    b: float = 0.0,
    c: float = 1.0,
    growth: bool = True,
    backend: str = "auto",
) -> Projection:
    """Project per-rank decode cost over the next `horizon` steps.

    Inputs are per running request (numpy arrays or torch tensors, taken
    zero-copy): `req_rank` in [0, num_ranks), `req_kv` (KV length), `req_remaining`
    (predicted remaining decode steps). Returns `Projection(cost, backend)`, where
    cost[h, g] = a + b*n(h, g) + c*S(h, g) (float64, shape (horizon+1, num_ranks));
    see the module docstring. `horizon` may instead be an increasing sequence of
    steps: then row k is step horizon[k] (shape (len(horizon), num_ranks)).
    backend: "auto" (Triton for CUDA tensors, else the torch reference), "torch",
    or "triton" (CUDA, or CPU with TRITON_INTERPRET=1).
    Raises ValueError for a rank outside [0, num_ranks) or an unknown backend.
    """
    cnt, kvs, chosen = project_counts(req_rank, req_kv, req_remaining, num_ranks, horizon, growth, backend)
    return Projection(cost=_combine(cnt, kvs, a, b, c), backend=chosen)


def project_counts(req_rank, req_kv, req_remaining, num_ranks: int, horizon, growth: bool = True,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """The exact parts of `project_cost`: int64 n(h, g) and S(h, g) (see the module
    docstring) and the backend used. Both are sums over requests, so the counts of
    two sets of requests add up to those of their union, exactly: a caller may keep
    the counts of requests that stay and add those of a few new ones
    (`combine_counts` then gives what `project_cost` gives for all of them).
    Same arguments and errors as `project_cost`."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(_BACKENDS)}")
    rank, kv, rem, G, hs = _prepare(req_rank, req_kv, req_remaining, num_ranks, horizon)
    growth = bool(growth)
    if backend == "auto":
        if rank.is_cuda:
            try:
                _load_triton()
                chosen, why = "triton", "auto: CUDA tensors"
            except RuntimeError as exc:
                chosen, why = "torch", f"auto: CUDA tensors but {exc}"
        else:
            chosen, why = "torch", f"auto: {rank.device} tensors"
    else:
        chosen, why = backend, "requested"
    _log_choice(chosen, why)
    counts = _triton_counts if chosen == "triton" else _reference_counts
    return (*counts(rank, kv, rem, G, hs, growth), chosen)


def combine_counts(cnt, kvs, a: float = 0.0, b: float = 0.0, c: float = 1.0):
    """cost = a + b*n + c*S in float64 from `project_counts`' n and S (torch tensors,
    or numpy arrays such as `few_counts`'): the values `project_cost` returns, to
    the last bit."""
    return _combine(cnt, kvs, a, b, c)
