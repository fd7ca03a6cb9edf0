#!/usr/bin/env python3
"""Model of the streaming top-k (src/cuda/topk/topk_stream.cuh), not in CTest.

Runs the kernel's algorithm step for step in numpy (4096-logit chunks, a
6144-entry position-ordered candidate buffer, filter key > thr, cut to exactly
k when a chunk's survivors do not fit, final cut and ascending positions) and
checks it against a plain sort on many rows: ties to the lower position,
NaN ranked with -inf, -0 with +0. Prints the number of cuts per row, which is
what the kernel's time beyond the streaming read depends on.

    python3 tests/scripts/topk_stream_model.py
"""
import numpy as np

CHUNK, CAP = 4096, 6144


def order_key(x):
    u = x.astype(np.float32).view(np.uint32).copy()
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    u[nan] = 0xFF800000
    u[u == 0x80000000] = 0
    neg = (u & 0x80000000) != 0
    return np.where(neg, ~u, u | 0x80000000).astype(np.uint32)


def cut(keys, k):
    """(thr, need) of the k best by (key desc, position asc) in an ordered buffer."""
    thr = np.sort(keys)[::-1][k - 1]
    return int(thr), k - int(np.count_nonzero(keys > thr))


def keep(keys, pos, thr, need):
    eq_rank = np.cumsum(keys == thr) - 1
    m = (keys > thr) | ((keys == thr) & (eq_rank < need))
    return keys[m], pos[m]


def stream_topk(row, vis, k):
    if vis <= k:
        return np.array([i if i < vis else -1 for i in range(k)], np.int32), 0
    key = order_key(row[:vis])
    bk = np.zeros(0, np.uint32)
    bp = np.zeros(0, np.int64)
    thr, cuts = 0, 0
    hist1 = np.zeros(2048, np.int64)  # the kernel's incremental top-11-bit histogram
    for base in range(0, vis, CHUNK):
        ck = key[base:base + CHUNK]
        cp = np.arange(base, base + len(ck))
        m = ck > thr
        if len(bk) + m.sum() > CAP:
            assert np.array_equal(hist1, np.bincount(bk >> 21, minlength=2048))
            t, need = cut(bk, k)
            bk, bp = keep(bk, bp, t, need)
            assert len(bk) == k
            # the kernel's update: bins above t's unchanged, t's bin holds k - (keys above it), lower bins 0
            d1 = t >> 21
            above1 = int(hist1[d1 + 1:].sum())
            hist1[:d1] = 0
            hist1[d1] = k - above1
            thr, cuts = t, cuts + 1
            m = ck > thr
        np.add.at(hist1, ck[m] >> 21, 1)
        bk = np.concatenate([bk, ck[m]])
        bp = np.concatenate([bp, cp[m]])
        assert len(bk) <= CAP
    assert np.array_equal(hist1, np.bincount(bk >> 21, minlength=2048))
    t, need = cut(bk, k)
    _, sel = keep(bk, bp, t, need)
    assert len(sel) == k and np.all(np.diff(sel) > 0)
    return sel.astype(np.int32), cuts


def reference(row, vis, k):
    if vis <= k:
        return np.array([i if i < vis else -1 for i in range(k)], np.int32)
    x = row[:vis].astype(np.float32).copy()
    x[np.isnan(x)] = -np.inf
    x[x == 0] = 0.0  # -0 ties with +0
    order = np.lexsort((np.arange(vis), -x.astype(np.float64)))  # value desc, then position asc
    return np.sort(order[:k]).astype(np.int32)


def main():
    rng = np.random.default_rng(0)
    n_rows, cut_counts = 0, {}
    kinds = {
        "distinct": lambda n: rng.uniform(-4, 4, n).astype(np.float32),
        "quantized": lambda n: (np.round(rng.uniform(-4, 4, n) * 8) / 8).astype(np.float32),
        "levels": lambda n: rng.choice(np.array([-2, -1, -0.0, 0.0, 0.25, 0.5, 1, 1.5, 3], np.float32), n),
        "special": lambda n: rng.choice(np.array([0.5, -np.inf, np.nan, np.inf, -0.0, 0.0, 9.0], np.float32), n,
                                        p=[.66, .08, .04, .01, .06, .06, .09]),
        "ascending": lambda n: (np.arange(n) * 1e-3 - 3).astype(np.float32),
        "descending": lambda n: (3 - np.arange(n) * 1e-3).astype(np.float32),
        "equal": lambda n: np.full(n, 0.75, np.float32),
    }
    for name, gen in kinds.items():
        for S, k in [(65536, 2048), (20000, 2048), (12000, 7), (9000, 1)]:
            row = gen(S)
            for vis in [0, 1, k, k + 1, 4097, 6145, 8193, S]:
                vis = min(vis, S)
                got, cuts = stream_topk(row, vis, k)
                want = reference(row, vis, k)
                assert np.array_equal(got, want), (name, S, k, vis)
                n_rows += 1
                if vis == S and k == 2048:
                    cut_counts[(name, S)] = cuts
    print(f"model == reference on {n_rows} rows")
    for (name, S), c in sorted(cut_counts.items()):
        print(f"  cuts in a full row: {name:11s} S={S:6d}: {c}")


if __name__ == "__main__":
    main()
