"""GPU tests (skipped without a CUDA device): each op against the CPU op, the
sparse MLA op on a CUDA layer's own intermediates bit for bit, DSALayer(cuda)
against `dsa run --backend cuda --dump` bit for bit, and ops on a non-default
torch stream (ops, and two layer steps back to back), ops through an unknown
DLPack exporter, the layer's input checks. DSALAB_SLOW=1 adds the seed shape (T = 4096, H = 128)."""
import os

import numpy as np
import pytest
import torch

import dsalab
from conftest import bits_equal, cli_flags, read_safetensors, run_cli
from test_ops_cpu import fp8_inputs, paged_inputs, rel_err_masked, sparse_inputs

pytestmark = pytest.mark.skipif(not (dsalab.cuda_available() and torch.cuda.is_available()),
                                reason="no CUDA device (or torch without CUDA)")


def small_gpu_config(num_heads=64, topk=128, **kw):
    """tests/gpu/small_gpu_config.h: every width the kernels specialize on is real."""
    return dsalab.load_config(None, hidden_size=1024, q_lora_rank=512, num_heads=num_heads, index_topk=topk, **kw)


def cuda(*ts):
    return [t.cuda() for t in ts]


@pytest.mark.parametrize("H,K", [(64, 128), (128, 2048)])
def test_sparse_mla_fwd_cuda_matches_cpu(H, K):
    q, kv, idx = sparse_inputs(T=37, H=H, S=3000, K=K, seed=10)
    scale = dsalab.load_config().softmax_scale
    ref = dsalab.sparse_mla_fwd(q, kv, idx, scale)
    got = [t.cpu() for t in dsalab.sparse_mla_fwd(*cuda(q, kv, idx), scale)]
    o, ro = got[0].double(), ref[0].double()
    assert torch.linalg.norm(o - ro) / torch.linalg.norm(ro) <= 1e-2
    assert torch.equal(torch.isinf(got[2]), torch.isinf(ref[2]))
    fin = torch.isfinite(ref[2])
    assert (got[2][fin] - ref[2][fin]).abs().max() <= 1e-3
    # Deterministic: the same bits twice.
    again = dsalab.sparse_mla_fwd(*cuda(q, kv, idx), scale)
    bits_equal(again[0].cpu(), got[0])


def test_fp8_mqa_logits_cuda_matches_cpu():
    q, k, ks, w, s, e = fp8_inputs(M=40, HI=64, N=700, seed=11)
    ref = dsalab.fp8_mqa_logits(q, (k, ks), w, s, e)
    got = dsalab.fp8_mqa_logits(*cuda(q), (*cuda(k, ks),), *cuda(w, s, e)).cpu()
    assert rel_err_masked(got, ref.double()) <= 1e-3


def test_fp8_paged_mqa_logits_cuda_matches_cpu():
    q, cache, w, ctx, bt, _, _ = paged_inputs(B=3, next_n=2, HI=64, bs=64, seed=12)
    ref = dsalab.fp8_paged_mqa_logits(q, cache, w, ctx, bt, None, 256)
    meta = dsalab.get_paged_mqa_logits_metadata(ctx.cuda(), 64, 132)
    got = dsalab.fp8_paged_mqa_logits(*cuda(q, cache, w, ctx, bt), meta, 256).cpu()
    assert rel_err_masked(got, ref.double()) <= 1e-3


def test_topk_cuda_matches_cpu():
    g = torch.Generator().manual_seed(13)
    T, S, k = 33, 5000, 2048
    logits = torch.randn((T, S), generator=g)
    logits[3, :100] = 1.0  # ties
    lengths = torch.randint(0, S + 10, (T,), generator=g, dtype=torch.int32)
    ref = dsalab.topk(logits, k, lengths)
    got = dsalab.topk(logits.cuda(), k, lengths.cuda()).cpu()
    assert torch.equal(got, ref)


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_rope_quant_append_cuda_matches_cpu(kv_dtype):
    cfg = dsalab.load_config(None, kv_cache_dtype=kv_dtype)
    g = torch.Generator().manual_seed(14)
    T, slots = 37, 256
    c_kv = torch.randn((T, 512), generator=g).to(torch.bfloat16)
    k_pe = torch.randn((T, 64), generator=g).to(torch.bfloat16)
    pos = torch.randint(0, 100000, (T,), generator=g, dtype=torch.int32)
    slot = ((torch.arange(T) * 67 + 5) % slots).to(torch.int64)
    row = 1152 if kv_dtype == "bf16" else 656
    a = torch.full((slots, row), 0xFF, dtype=torch.uint8)
    b = a.cuda()
    view = (lambda x: x.view(torch.bfloat16)) if kv_dtype == "bf16" else (lambda x: x)
    dsalab.rope_quant_append(cfg, c_kv, k_pe, pos, slot, view(a))
    dsalab.rope_quant_append(cfg, *cuda(c_kv, k_pe, pos, slot), view(b))
    b = b.cpu()
    # c_kv (bf16 copy, or e4m3 + ue8m0 scales) byte for byte; the rotated k_pe
    # within one bf16 ulp (ops.h: the CPU's sin / cos may differ from sincosf
    # in the last bit); untouched slots keep their poison.
    pe0 = 1024 if kv_dtype == "bf16" else 528
    bits_equal(b[:, :pe0], a[:, :pe0])
    pa, pb = a[:, pe0:].contiguous().view(torch.bfloat16).double(), b[:, pe0:].contiguous().view(torch.bfloat16).double()
    written = set(slot.tolist())
    for s in range(slots):
        if s not in written:
            assert (b[s] == 0xFF).all()
    fin = ~pa.isnan()
    assert torch.equal(pa.isnan(), pb.isnan())
    assert ((pa[fin] - pb[fin]).abs() <= torch.maximum(pa[fin].abs(), pb[fin].abs()) * 2 ** -7).all()


def test_ops_on_mixed_devices_are_value_errors():
    q, kv, idx = sparse_inputs(T=3, S=50, K=8)
    with pytest.raises(ValueError) as e:
        dsalab.sparse_mla_fwd(q.cuda(), kv, idx.cuda(), 0.1)
    assert "kv" in str(e.value)


def layer_step(cfg, requests, seed, trace=False, stream=None):
    layer = dsalab.DSALayer(cfg, seed=seed, device="cuda")
    T = sum(n for _, _, n in requests)
    bits = dsalab.generate_hidden(cfg, T, seed + 1000)
    hidden = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).cuda()
    cache = dsalab.CacheManager(cfg, tokens=sum(c + n for _, c, n in requests) + 256, device="cuda")
    cache.fill(0xFF)
    batch = cache.step(requests)
    if stream is None:
        res = layer.forward(hidden, batch, trace=trace)
    else:
        with torch.cuda.stream(stream):
            res = layer.forward(hidden, batch, trace=trace)
        stream.synchronize()
    return layer, cache, res


def test_sparse_mla_fwd_on_layer_intermediates_equals_the_layer():
    cfg = small_gpu_config(num_heads=128, topk=128)
    _, cache, (out, tr) = layer_step(cfg, [(0, 0, 150), (1, 0, 40)], seed=21, trace=True)
    q_cat = torch.from_numpy(tr["q_cat"]).to(torch.bfloat16).cuda()
    kv = torch.from_dlpack(cache.latent_cache())
    assert kv.dtype == torch.bfloat16 and kv.shape[1] == 576 and kv.is_cuda
    idx = torch.from_numpy(tr["topk_global"]).cuda()
    o, m, lse = dsalab.sparse_mla_fwd(q_cat, kv, idx, cfg.softmax_scale)
    bits_equal(o.cpu(), torch.from_numpy(tr["attn_out"]).to(torch.bfloat16))
    bits_equal(lse.cpu(), torch.from_numpy(tr["attn_lse"]))
    bits_equal(m.cpu(), torch.from_numpy(tr["attn_max"]))


def _layer_vs_cli(cli, tmp_path, cfg, requests, seed):
    dump = tmp_path / "cuda.safetensors"
    req = ",".join(f"{c}:{n}" for _, c, n in requests)
    run_cli(cli, "run", "--backend", "cuda", *cli_flags(cfg), "--requests", req, "--seed", seed, "--dump", dump,
            "--no-intermediates")
    ref = read_safetensors(dump)
    _, _, out = layer_step(cfg, requests, seed)
    bits_equal(out.cpu(), ref["output"])


@pytest.mark.parametrize("o_proj", [False, True])
def test_layer_cuda_equals_dsa_run_backend_cuda(cli, tmp_path, o_proj):
    _layer_vs_cli(cli, tmp_path, small_gpu_config(o_proj=o_proj), [(0, 0, 70), (1, 0, 5)], seed=5)


@pytest.mark.skipif(os.environ.get("DSALAB_SLOW") != "1", reason="seed shape (T = 4096, H = 128): set DSALAB_SLOW=1")
def test_layer_cuda_equals_dsa_run_backend_cuda_seed_shape(cli, tmp_path):
    _layer_vs_cli(cli, tmp_path, dsalab.load_config(), [(0, 0, 4096)], seed=1)


def test_layer_cuda_close_to_cpu_reference():
    cfg = small_gpu_config()
    reqs = [(0, 0, 70), (1, 0, 5)]
    _, _, gpu = layer_step(cfg, reqs, seed=6)
    layer = dsalab.DSALayer(cfg, seed=6, device="cpu")
    bits = dsalab.generate_hidden(cfg, 75, 1006)
    cache = dsalab.CacheManager(cfg, tokens=400, device="cpu")
    cpu = layer.forward(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16), cache.step(reqs))
    g, c = gpu.cpu().double(), cpu.double()
    assert torch.linalg.norm(g - c) / torch.linalg.norm(c) <= 2e-2


def test_ops_on_a_non_default_stream():
    """Inputs are written on a side stream after a long sleep; an op that ran on
    any stream but the caller's would read them before they exist. (Everything is
    on the device before the sleep: a host-to-device copy inside the stream would
    wait for the sleep on the host and close the window.)"""
    q, kv, idx = sparse_inputs(T=37, H=64, S=3000, K=128, seed=15)
    scale = 0.07
    expect = [t.cpu() for t in dsalab.sparse_mla_fwd(*cuda(q, kv, idx), scale)]
    s = torch.cuda.Stream()
    q_dev, kv_dev, idx_dev = cuda(q, kv, idx)
    qd = torch.full(q.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)
        qd.copy_(q_dev)
        got = dsalab.sparse_mla_fwd(qd, kv_dev, idx_dev, scale)
    s.synchronize()
    for a, b in zip(got, expect):
        bits_equal(a.cpu(), b)


def test_layer_steps_back_to_back_on_a_side_stream():
    """A prefill then a decode step of one request on one layer, queued on a side
    stream behind a long sleep with no synchronization between them: the second
    forward must not upload its metadata into (or reallocate) the buffers the
    first step's still-queued kernels read. Both outputs equal, bit for bit, the
    same steps on the default stream with a fresh layer and cache and syncs between."""
    cfg = small_gpu_config()
    seed = 8
    steps = [((0, 0, 40), slice(0, 40)), ((0, 40, 1), slice(40, 41))]
    bits = dsalab.generate_hidden(cfg, 41, seed + 1000)
    hidden = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).cuda()

    def fresh():
        layer = dsalab.DSALayer(cfg, seed=seed, device="cuda")
        cache = dsalab.CacheManager(cfg, tokens=512, device="cuda")
        cache.fill(0xFF)
        torch.cuda.synchronize()
        return layer, cache

    layer, cache = fresh()
    expect = []
    for req, rows in steps:
        expect.append(layer(hidden[rows], cache.step([req])).cpu())
        torch.cuda.synchronize()

    layer, cache = fresh()
    hd = torch.full_like(hidden, float("nan"))
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    got = []
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        hd.copy_(hidden)  # hidden's producer, on the side stream behind the sleep
        for req, rows in steps:
            got.append(layer(hd[rows], cache.step([req])))
    s.synchronize()
    for g, e in zip(got, expect):
        bits_equal(g.cpu(), e)


class _Exporter:
    """A DLPack exporter dsalab does not know (as a JAX array is): its op runs on
    the legacy default stream and the call returns once that stream is done."""

    def __init__(self, t):
        self._t = t
        self.shape = t.shape

    def __dlpack__(self, *args, **kwargs):
        return self._t.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_ops_on_an_unknown_dlpack_framework_on_cuda():
    q, kv, idx = cuda(*sparse_inputs(T=37, H=64, S=3000, K=128, seed=16))
    expect = dsalab.sparse_mla_fwd(q, kv, idx, 0.07)
    got = dsalab.sparse_mla_fwd(_Exporter(q), _Exporter(kv), _Exporter(idx), 0.07)
    for a, b in zip(got, expect):
        assert a.is_cuda
        bits_equal(a.cpu(), b.cpu())


def test_layer_cuda_bad_inputs():
    cfg = small_gpu_config()
    layer = dsalab.DSALayer(cfg, seed=1, device="cuda")
    cache = dsalab.CacheManager(cfg, tokens=256, device="cuda")
    batch = cache.step([(0, 0, 4)])
    h = torch.randn((4, cfg.hidden_size), device="cuda").to(torch.bfloat16)
    with pytest.raises(ValueError) as e:
        layer.forward(h.cpu(), batch)
    assert "hidden" in str(e.value)
    with pytest.raises(ValueError) as e:
        layer.forward(torch.cat([h, h], 1)[:, ::2], batch)
    assert "contiguous" in str(e.value)
    cpu_cache = dsalab.CacheManager(cfg, tokens=256, device="cpu")
    with pytest.raises(ValueError):
        layer.forward(h, cpu_cache.step([(0, 0, 4)]))
    # A contiguous view at an odd element offset: refused before any CUDA work
    # (cuBLASLt's 16-byte loads would fault and end the context).
    buf = torch.empty(4 * cfg.hidden_size + 8, dtype=torch.bfloat16, device="cuda")
    odd = buf[1:1 + 4 * cfg.hidden_size].view(4, cfg.hidden_size)
    odd.copy_(h)
    assert odd.is_contiguous() and odd.data_ptr() % 16 != 0
    with pytest.raises(ValueError) as e:
        layer.forward(odd, batch)
    msg = str(e.value)
    assert "hidden" in msg and "16-byte" in msg and ".clone()" in msg and e.value.parameter == "hidden"
    # The fix works and the context is alive.
    bits_equal(layer.forward(odd.clone(), batch).cpu(), layer.forward(h, batch).cpu())
    torch.cuda.synchronize()
