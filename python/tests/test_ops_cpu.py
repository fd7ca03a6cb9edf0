"""Each op on CPU torch tensors against an independent float64 computation,
within the spec's bounds (section 7), and strided inputs against dense ones
bit for bit."""
import math

import numpy as np
import pytest
import torch

import dsalab
from _refs import mqa_logits, rope_interleaved, sparse_mla, topk, yarn_inv_freq
from conftest import bits_equal

D_QK, D_V = 576, 512


def uniform(shape, gen, lo=-1.0, hi=1.0):
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)


def sparse_inputs(T=5, H=64, S=300, K=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = uniform((T, H, D_QK), g).to(torch.bfloat16)
    kv = uniform((S, D_QK), g).to(torch.bfloat16)
    idx = torch.randint(0, S, (T, K), generator=g, dtype=torch.int32)
    idx[0, ::3] = -1          # skipped
    idx[1, ::5] = S + 7       # out of range: skipped
    idx[2, :] = -1            # nothing valid: lse +inf, max -inf, out 0
    return q, kv, idx


def check_sparse(out, mx, lse, ref):
    r_out, r_mx, r_lse = ref
    assert out.dtype == torch.bfloat16 and mx.dtype == torch.float32 and lse.dtype == torch.float32
    o, ro = out.double(), r_out
    assert torch.linalg.norm(o - ro) / torch.linalg.norm(ro) <= 1e-2
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse)) and torch.equal(torch.isinf(mx), torch.isinf(r_mx))
    fin = torch.isfinite(r_lse)
    assert (lse.double()[fin] - r_lse[fin]).abs().max() <= 1e-3
    assert (mx.double()[fin] - r_mx[fin]).abs().max() <= 1e-4
    assert (lse[~fin] == math.inf).all() and (mx[~fin] == -math.inf).all() and (out[~fin] == 0).all()


def test_sparse_mla_fwd_matches_float64():
    q, kv, idx = sparse_inputs()
    scale = 576 ** -0.5
    out, mx, lse = dsalab.sparse_mla_fwd(q, kv, idx, scale)
    assert out.shape == (5, 64, D_V) and mx.shape == (5, 64) and lse.shape == (5, 64)
    check_sparse(out, mx, lse, sparse_mla(q, kv, idx, scale))


def test_sparse_mla_fwd_flashmla_shapes_and_strided_views_give_the_same_bits():
    q, kv, idx = sparse_inputs(seed=1)
    scale = 0.1
    dense = dsalab.sparse_mla_fwd(q, kv, idx, scale)
    # FlashMLA's layout: kv [S, 1, 576], indices [T, 1, topk]; q and kv as views
    # into wider buffers (row strides larger than the row).
    qb = torch.full((q.shape[0], q.shape[1], 640), float("nan"), dtype=torch.bfloat16)
    qb[:, :, :D_QK] = q
    q_view = qb[:, :, :D_QK]
    kvb = torch.full((kv.shape[0], 1, 700), float("nan"), dtype=torch.bfloat16)
    kvb[:, 0, :D_QK] = kv
    kv_view = kvb[:, :, :D_QK]
    assert not q_view.is_contiguous() and not kv_view.is_contiguous()
    strided = dsalab.sparse_mla_fwd(q_view, kv_view, idx[:, None, :], scale, d_v=512)
    for a, b in zip(dense, strided):
        bits_equal(a, b)


def test_sparse_mla_fwd_numpy_bf16_bits():
    q, kv, idx = sparse_inputs(T=3, seed=2)
    ref = dsalab.sparse_mla_fwd(q, kv, idx, 0.05)
    out, mx, lse = dsalab.sparse_mla_fwd(q.view(torch.int16).numpy().view(np.uint16), kv.view(torch.int16).numpy().view(np.uint16),
                                         idx.numpy(), 0.05)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint16
    bits_equal(torch.from_numpy(out.view(np.int16)).view(torch.bfloat16), ref[0])
    bits_equal(torch.from_numpy(lse), ref[2])


def fp8_inputs(M=6, HI=8, N=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn((M, HI, 128), generator=g) * 2).to(torch.float8_e4m3fn)
    k = (torch.randn((N, 128), generator=g) * 2).to(torch.float8_e4m3fn)
    k_scale = torch.exp2(torch.randint(-6, 2, (N,), generator=g).float())
    w = torch.randn((M, HI), generator=g) * 0.1
    start = torch.randint(0, N // 2, (M,), generator=g, dtype=torch.int32)
    end = torch.clamp(start + torch.randint(0, N, (M,), generator=g, dtype=torch.int32), max=N + 5)
    end[0] = start[0]  # an empty range
    return q, k, k_scale, w, start, end


def rel_err_masked(got, ref):
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), "the -inf masks differ"
    fin = torch.isfinite(ref)
    return (torch.linalg.norm(got.double()[fin] - ref[fin]) / max(torch.linalg.norm(ref[fin]).item(), 1e-30)).item()


def test_fp8_mqa_logits_matches_float64():
    q, k, ks, w, s, e = fp8_inputs()
    logits = dsalab.fp8_mqa_logits(q, (k, ks), w, s, e)
    assert logits.shape == (6, 150) and logits.dtype == torch.float32
    assert rel_err_masked(logits, mqa_logits(q, k, ks, w, s, e)) <= 1e-5


def test_fp8_mqa_logits_takes_uint8_bits_for_fp8():
    q, k, ks, w, s, e = fp8_inputs(seed=3)
    a = dsalab.fp8_mqa_logits(q, (k, ks), w, s, e)
    b = dsalab.fp8_mqa_logits(q.view(torch.uint8), (k.view(torch.uint8), ks), w, s, e)
    bits_equal(a, b)


def paged_inputs(B=3, next_n=2, HI=8, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    context = torch.tensor([5, 40, 33][:B], dtype=torch.int32)
    max_blocks = 4
    num_blocks = 16
    block_table = torch.randperm(num_blocks, generator=g)[:B * max_blocks].reshape(B, max_blocks).to(torch.int32)
    keys = (torch.randn((num_blocks, bs, 128), generator=g) * 2).to(torch.float8_e4m3fn)
    scales = torch.exp2(torch.randint(-4, 3, (num_blocks, bs), generator=g).float())
    cache = torch.empty((num_blocks, bs * 132), dtype=torch.uint8)
    cache[:, :bs * 128] = keys.view(torch.uint8).reshape(num_blocks, bs * 128)
    cache[:, bs * 128:] = scales.view(torch.uint8).reshape(num_blocks, bs * 4)
    q = (torch.randn((B, next_n, HI, 128), generator=g) * 2).to(torch.float8_e4m3fn)
    w = torch.randn((B * next_n, HI), generator=g) * 0.1
    return q, cache.reshape(num_blocks, bs, 1, 132), w, context, block_table, keys, scales


def test_fp8_paged_mqa_logits_matches_float64():
    B, next_n, bs = 3, 2, 16
    q, cache, w, ctx, bt, keys, scales = paged_inputs(B, next_n, bs=bs)
    max_len = 48
    meta = dsalab.get_paged_mqa_logits_metadata(ctx, bs, 132)
    logits = dsalab.fp8_paged_mqa_logits(q, cache, w, ctx, bt, meta, max_len)
    assert logits.shape == (B * next_n, max_len) and logits.dtype == torch.float32
    ref = torch.full((B * next_n, max_len), -math.inf, dtype=torch.float64)
    for b in range(B):
        for j in range(next_n):
            row = b * next_n + j
            visible = int(ctx[b]) - next_n + j + 1
            for p in range(max(visible, 0)):
                blk, off = int(bt[b, p // bs]), p % bs
                s = torch.relu(q[b, j].double() @ keys[blk, off].double())
                ref[row, p] = float(scales[blk, off]) * float((s * w[row].double()).sum())
    assert rel_err_masked(logits, ref) <= 1e-5
    # The flat cache form [num_blocks, block_size * 132] reads the same bytes.
    flat = dsalab.fp8_paged_mqa_logits(q, cache.reshape(cache.shape[0], -1), w, ctx, bt, None, max_len)
    bits_equal(flat, logits)


def test_topk_matches_reference_with_ties_nan_and_lengths():
    g = torch.Generator().manual_seed(4)
    T, S, k = 7, 90, 16
    logits = torch.randint(-5, 5, (T, S), generator=g).float()  # many ties
    logits[1, 3] = float("nan")
    logits[2, :] = float("nan")
    lengths = torch.tensor([90, 10, 90, 0, 16, 200, 17], dtype=torch.int32)
    got = dsalab.topk(logits, k, lengths)
    assert got.dtype == torch.int32 and got.shape == (T, k)
    assert torch.equal(got, topk(logits, k, lengths))
    # A strided logits view (row stride > S) gives the same answer.
    wide = torch.full((T, S + 13), 1e30)
    wide[:, :S] = logits
    assert torch.equal(dsalab.topk(wide[:, :S], k, lengths), got)


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_rope_quant_append_matches_float64(kv_dtype):
    cfg = dsalab.load_config(None, kv_cache_dtype=kv_dtype)
    g = torch.Generator().manual_seed(5)
    T, slots = 9, 40
    c_kv = torch.randn((T, 512), generator=g).to(torch.bfloat16)
    k_pe = torch.randn((T, 64), generator=g).to(torch.bfloat16)
    positions = torch.tensor([0, 1, 7, 100, 4095, 4096, 20000, 3, 5], dtype=torch.int32)
    slot_mapping = torch.tensor([3, 0, 39, 12, -1, 17, 25, 40, 8], dtype=torch.int64)  # -1 and 40: outside, skipped
    row = 1152 if kv_dtype == "bf16" else 656
    cache_u8 = torch.full((slots, row), 0xFF, dtype=torch.uint8)
    cache = cache_u8.view(torch.bfloat16) if kv_dtype == "bf16" else cache_u8
    dsalab.rope_quant_append(cfg, c_kv, k_pe, positions, slot_mapping, cache)
    pe_ref = rope_interleaved(k_pe, positions, yarn_inv_freq(cfg))
    written = set()
    for t in range(T):
        s = int(slot_mapping[t])
        if not 0 <= s < slots:
            continue
        written.add(s)
        r = cache_u8[s]
        if kv_dtype == "bf16":
            vals = r.view(torch.bfloat16)
            bits_equal(vals[:512], c_kv[t])
            pe = vals[512:].double()
        else:
            fp8 = r[:512].view(torch.float8_e4m3fn).double()
            scales = r[512:528].view(torch.float32).double()
            for gi in range(4):
                block = c_kv[t, gi * 128:(gi + 1) * 128].float()
                amax = max(block.abs().max().item(), 1e-4)
                scale = 2.0 ** math.ceil(math.log2(amax / 448.0))
                assert scales[gi] == scale
                expect = (block / scale).to(torch.float8_e4m3fn)
                bits_equal(r[gi * 128:(gi + 1) * 128].view(torch.float8_e4m3fn), expect)
            pe = r[528:656].view(torch.bfloat16).double()
            assert fp8.isfinite().all()
        # The spec's RoPE bound (relative norm 1e-2); up to the original context
        # (4096) the angles are small enough that each value is within a bf16 ulp.
        assert torch.linalg.norm(pe - pe_ref[t]) / torch.linalg.norm(pe_ref[t]) <= 1e-2, f"token {t}"
        if int(positions[t]) <= 4096:
            assert ((pe - pe_ref[t]).abs() <= pe_ref[t].abs() * 2 ** -8 + 1e-6).all(), f"token {t}"
    for s in range(slots):
        if s not in written:
            assert (cache_u8[s] == 0xFF).all(), f"slot {s} was written"


def test_ops_accept_tensors_requiring_grad():
    q, kv, idx = sparse_inputs(T=3, seed=6)
    a = dsalab.sparse_mla_fwd(q.float().requires_grad_().to(torch.bfloat16), kv, idx, 0.1)
    b = dsalab.sparse_mla_fwd(q, kv, idx, 0.1)
    bits_equal(a[0], b[0])
