"""A pool round's matching: bfio's pool rule (`BFIO._select_at`) offers, each round,
the open ranks (rows) to the candidates (columns) of a score matrix ST, rank-major,
and takes the matching of ranks to distinct candidates with the best total score.

Small rounds go to scipy's assignment solver as they are. A large round (at G=256
with few free slots, ~200 ranks by ~1,000 candidates) is first settled at the
candidates' best scores (`match_at_best`: a bound, a bipartite matching, exact), and
only where that bound is not reached is the solver given the problem, pruned to the
candidates some rank could use (`matchable_columns`).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_bipartite_matching

#: score of an impossible pair: finite, so the assignment solver takes the matrix
#: as is, and far below any real score (|score| < G * tokens * sum(w) << 1e13).
NEG = -1e13

#: `match_at_best` bounds the ranks left out of the matching at their candidates'
#: best scores exactly, over every split of them (2^d small assignment problems),
#: up to this many of them
MOST_LEFT_OUT = 3


def match_round(ST: np.ndarray, live: np.ndarray, loads: np.ndarray | None = None,
                prune_after: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Match ranks (rows of ST, the open ranks `live`, with their `loads` for ties) to
    candidates (columns), at most one each, for the best total score; pairs at the
    NEG sentinel (taken candidates) are dropped. A round with at least `prune_after`
    candidates (0: none) and 4 per rank is large (`is_large`). Returns (candidates,
    ranks)."""
    large = is_large(ST, prune_after)
    found = match_at_best(ST, loads) if large else None
    if found is not None:
        rs, js = found
    else:
        cols = matchable_columns(ST, prune_after) if large else None
        M = ST if cols is None else ST[:, cols]
        if M.shape[0] < M.shape[1]:
            rs, js = linear_sum_assignment(M, maximize=True)
        else:  # as (candidates, ranks), as the solver sees any square or taller problem
            js, rs = linear_sum_assignment(M.T, maximize=True)
        if cols is not None:
            js = cols[js]
    keep = ST[rs, js] > NEG / 2
    js, rs = js[keep], rs[keep]
    return js.astype(np.int64), live[rs].astype(np.int64)


def is_large(ST: np.ndarray, prune_after: int) -> bool:
    """Whether a round's problem (m ranks, n candidates) is large enough to be
    settled or pruned before the solver. Smaller ones (every pool call below
    G=128, whose window is 4G candidates) are quick for the solver and keep its
    very matchings, ties included, which every table at those sizes measured."""
    m, n = ST.shape
    return bool(prune_after) and n >= prune_after and n >= 4 * m


def matchable_columns(ST: np.ndarray, prune_after: int) -> np.ndarray | None:
    """For a large problem (`is_large`), the candidates among some rank's m best
    (m ranks; ties at the m-th included); None: all. Some optimal matching uses
    only those: a rank matched outside its m best leaves one of them free (the
    other m - 1 ranks hold at most m - 1), and moving to it scores at least as
    much. So the matched total is the full problem's (at G=256 the problem
    shrinks from 1,024 candidates to a few hundred, and the solver's time with
    it); among equal-score matchings (a candidate that lifts no rank's envelope
    scores the same on every rank where it fits) it may pick another. ST: (m
    ranks, n candidates)."""
    m, n = ST.shape
    if not is_large(ST, prune_after):
        return None
    nth = np.partition(ST, n - m, axis=1)[:, n - m]  # each rank's m-th best
    return np.flatnonzero((ST >= nth[:, None]).any(axis=0))


def match_at_best(ST: np.ndarray, loads: np.ndarray | None = None):
    """An optimal matching of a large pool round (ST: (m ranks, n candidates) scores,
    m <= n; `loads`: the ranks' loads, to order ties), found without the
    assignment solver on the whole problem where it reaches a bound; None where
    it does not (the solver then decides). Returns (ranks, candidates), every
    rank matched.

    Why: at G=256 with few free slots a round's problem is ~200 ranks by several
    hundred candidates, and the solver takes 10-30 ms on it. Yet ~99% of its scores
    are their candidate's best (a candidate that lifts no rank's envelope scores
    the same on every rank where it fits), and its rows come in a few dozen
    kinds, which is where the solver's augmenting paths run longest.

    The bound: let b_j be candidate j's best score over the ranks and P the m
    candidates with the largest b_j. A maximum matching of the ranks on the pairs
    at b_j within P (Hopcroft-Karp) leaves out a set H of d ranks; none: it is
    optimal, as no matching scores more than the sum of b_j over P. Else, in any
    matching let H put k ranks on candidates outside P and the rest on the set
    A of candidates in P: the other m - d ranks score at most their candidates'
    b_j, at most the m - d largest b_j outside those d candidates, which are P
    without A and without its k lowest, each at least P's k lowest. So no
    matching scores more than, over the splits of H into k ranks outside P and
    d - k inside it,
        sum of b_j over P - the k lowest b_j of P
        + best matching of the k ranks to candidates outside P (ST)
        + best matching of the d - k to candidates in P (ST - b_j),
    two small assignment problems per split. The best split's candidates give
    the others P without them and without its k lowest; if those k are P's k
    lowest in b_j and the others can all sit at their best there (again a
    bipartite matching), the bound is reached: optimal. The matching among the
    pairs at b_j may differ from the solver's among equal totals: the ranks are
    offered lightest first (`loads`) and the candidates largest b_j first to
    Hopcroft-Karp, which starts from a greedy matching in that order, so the
    heavy candidates tend to go to the light ranks, as LPT would (in index
    order instead, the scale sweep's ratio fell in seven of its eight large
    paper-mode cells, by up to 8%)."""
    m, n = ST.shape
    if m == 0:
        return None
    # (rows are taken in this order, lightest first: `left` and `rest` index it)
    lightest = np.argsort(loads, kind="stable") if loads is not None else np.arange(m)
    best = ST.max(axis=0)
    order = np.argsort(-best, kind="stable")
    if best[order[m - 1]] <= NEG / 2:
        return None
    top = order[:m]
    seat = seats_at_best(ST, lightest, top, best)
    if seat is None:
        return None
    left = np.flatnonzero(seat < 0)
    d = left.size
    if d == 0:
        return lightest, top[seat]
    if d > MOST_LEFT_OUT:
        return None
    outside = order[m:]
    lowest = np.concatenate([[0.0], np.cumsum(best[top[::-1][:d]])])  # the k lowest b_j of P, summed
    inside = ST[np.ix_(lightest[left], top)] - best[top]
    split, value = None, -np.inf
    for mask in range(1 << d):
        out = np.array([(mask >> i) & 1 for i in range(d)], bool)
        total, cols = -lowest[out.sum()], np.empty(d, np.int64)
        for pick, scores, among in ((out, ST[np.ix_(lightest[left[out]], outside)], outside),
                                    (~out, inside[~out], top)):
            if pick.any():
                r, c = linear_sum_assignment(scores, maximize=True)
                total += scores[r, c].sum()
                cols[np.flatnonzero(pick)[r]] = among[c]
        if total > value:
            split, value = (out, cols), total
    out, taken = split
    k = int(out.sum())
    remain = top[~np.isin(top, taken)]  # (in order of b_j, largest first)
    target, dropped = remain[:m - d], remain[m - d:]
    if not np.array_equal(best[dropped], best[top[m - k:]]):
        return None
    rest = lightest[np.delete(np.arange(m), left)]
    seat = seats_at_best(ST, rest, target, best)
    if seat is None or (seat < 0).any():
        return None
    return np.append(rest, lightest[left]), np.append(target[seat], taken)


def seats_at_best(ST: np.ndarray, rows: np.ndarray, cols: np.ndarray, best: np.ndarray) -> np.ndarray | None:
    """A maximum matching of `rows` to distinct `cols` (no fewer) on the pairs where a
    row scores the column's best: for each row its position in `cols`, or -1; None
    when more than MOST_LEFT_OUT rows score no column at its best (that many are left
    out of any matching). Hopcroft-Karp's matching, whose greedy start seats each
    row in turn at its first free column: where the i-th row scores the i-th column
    at its best for every i, that is row i at column i, read off that diagonal
    without building the pairs (most rounds at G=256)."""
    k = rows.size
    if (ST[rows, cols[:k]] == best[cols[:k]]).all():
        return np.arange(k)
    pairs = ST[np.ix_(rows, cols)] == best[cols]
    if k - np.count_nonzero(pairs.any(axis=1)) > MOST_LEFT_OUT:
        return None
    return max_matching(pairs)


def max_matching(pairs: np.ndarray) -> np.ndarray:
    """A maximum matching of rows to distinct columns on the True pairs of a boolean
    matrix: for each row its column, or -1 (Hopcroft-Karp, in C by scipy). The sparse
    matrix is built from its parts: the pairs of a large round are ~99% True, and
    scipy's conversion of a dense matrix takes three times as long as the matching."""
    m, n = pairs.shape
    indptr = np.zeros(m + 1, np.int32)
    np.cumsum(np.count_nonzero(pairs, axis=1), out=indptr[1:])
    cols = np.tile(np.arange(n, dtype=np.int32), m)[pairs.ravel()]  # (row by row, ascending)
    graph = csr_array((np.ones(cols.size, bool), cols, indptr), shape=(m, n))
    return maximum_bipartite_matching(graph, perm_type="column")
