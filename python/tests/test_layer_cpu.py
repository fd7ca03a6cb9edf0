"""DSALayer(device="cpu") against `dsa run --dump` (the CPU reference behind
the command line), bit for bit, with synthetic weights from the same seed and
with the weights file the CLI saved."""
import numpy as np
import pytest
import torch

import dsalab
from conftest import bits_equal, cli_flags, read_safetensors, run_cli, small_cpu_config

REQUESTS = [(0, 0, 80), (1, 0, 9)]  # context above and below topk (64)
SEED = 7


def hidden_for(cfg, T, seed):
    """`dsa run` generates its hidden states with seed + 1000."""
    bits = dsalab.generate_hidden(cfg, T, seed + 1000)
    assert bits.dtype == np.uint16 and bits.shape == (T, cfg.hidden_size)
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def run_layer(layer, cfg, requests, hidden):
    cache = dsalab.CacheManager(cfg, tokens=sum(c + n for _, c, n in requests) + 64, device="cpu")
    cache.fill(0xFF)  # as dsa run: NaN in every slot nobody writes
    batch = cache.step(requests)
    return layer.forward(hidden, batch, trace=True)


@pytest.mark.parametrize("o_proj", [False, True])
def test_layer_cpu_equals_dsa_run_dump(cli, tmp_path, o_proj):
    cfg = small_cpu_config(o_proj=o_proj)
    dump = tmp_path / "ref.safetensors"
    req = ",".join(f"{c}:{n}" for _, c, n in REQUESTS)
    run_cli(cli, "run", *cli_flags(cfg), "--requests", req, "--seed", SEED, "--dump", dump)
    ref = read_safetensors(dump)
    assert ref["request_ids"].tolist() == [r[0] for r in REQUESTS]

    layer = dsalab.DSALayer(cfg, seed=SEED, device="cpu")
    T = sum(n for _, _, n in REQUESTS)
    out, trace = run_layer(layer, cfg, REQUESTS, hidden_for(cfg, T, SEED))
    assert out.dtype == torch.bfloat16 and out.shape == (T, layer.output_width)
    assert layer.output_width == (cfg.hidden_size if o_proj else cfg.num_heads * cfg.v_head_dim)
    bits_equal(out, ref["output"])
    for name in ("topk_local", "attn_lse", "attn_max", "idx_weights"):
        bits_equal(torch.from_numpy(trace[name]), ref[name])
    for name in ("q_cat", "attn_out", "c_kv"):
        bits_equal(torch.from_numpy(trace[name]).to(torch.bfloat16), ref[name])


def test_layer_cpu_reads_the_weights_file_the_cli_wrote(cli, tmp_path):
    cfg = small_cpu_config()
    wfile = tmp_path / "w.safetensors"
    run_cli(cli, "run", *cli_flags(cfg), "--requests", "0:3", "--seed", 11, "--save-weights", wfile, "--no-intermediates")
    T = 20
    hidden = hidden_for(cfg, T, 3)
    a, _ = run_layer(dsalab.DSALayer(cfg, seed=11, device="cpu"), cfg, [(0, 0, T)], hidden)
    b, _ = run_layer(dsalab.DSALayer(cfg, weights=wfile, device="cpu"), cfg, [(0, 0, T)], hidden)
    bits_equal(a, b)


def test_layer_cpu_decode_after_prefill_matches_one_prefill():
    """A prefill of 30 tokens then 2 decode steps gives the last tokens' outputs
    of one 32-token prefill bit for bit (causal attention, same cache rows)."""
    cfg = small_cpu_config()
    layer = dsalab.DSALayer(cfg, seed=2, device="cpu")
    hidden = hidden_for(cfg, 32, 5)
    full, _ = run_layer(layer, cfg, [(0, 0, 32)], hidden)
    cache = dsalab.CacheManager(cfg, tokens=64, device="cpu")
    layer.forward(hidden[:30], cache.step([(0, 0, 30)]))
    d1 = layer.forward(hidden[30:31], cache.step([(0, 30, 1)]))
    d2 = layer(hidden[31:32], cache.step([(0, 31, 1)]))
    bits_equal(torch.cat([d1, d2]), full[30:32])


def test_layer_cpu_strided_hidden_and_numpy_bits():
    cfg = small_cpu_config()
    layer = dsalab.DSALayer(cfg, seed=4, device="cpu")
    T = 6
    hidden = hidden_for(cfg, T, 9)
    a, _ = run_layer(layer, cfg, [(0, 0, T)], hidden)
    wide = torch.zeros((T, cfg.hidden_size * 2), dtype=torch.bfloat16)
    wide[:, ::2] = hidden
    b, _ = run_layer(layer, cfg, [(0, 0, T)], wide[:, ::2])
    bits_equal(a, b)
    c, _ = run_layer(layer, cfg, [(0, 0, T)], hidden.view(torch.int16).numpy().view(np.uint16))
    assert isinstance(c, np.ndarray) and c.dtype == np.uint16
    bits_equal(torch.from_numpy(c.view(np.int16)).view(torch.bfloat16), a)


def test_layer_forward_bad_inputs():
    cfg = small_cpu_config()
    layer = dsalab.DSALayer(cfg, seed=4, device="cpu")
    cache = dsalab.CacheManager(cfg, tokens=64, device="cpu")
    batch = cache.step([(0, 0, 4)])
    good = hidden_for(cfg, 4, 1)
    with pytest.raises(ValueError) as e:
        layer.forward(good[:3], batch)
    assert "hidden" in str(e.value) and "[4, 256]" in str(e.value)
    with pytest.raises(TypeError) as e:
        layer.forward(good.float(), batch)
    assert "hidden" in str(e.value)
    with pytest.raises(TypeError):
        layer.forward(good, "not a batch")
    nan = good.clone()
    nan[2, 5] = float("nan")
    with pytest.raises(ValueError) as e:
        layer.forward(nan, batch)
    assert "hidden" in str(e.value)
    other = dsalab.CacheManager(small_cpu_config(tokens_per_block=32), tokens=64, device="cpu")
    with pytest.raises(ValueError):
        layer.forward(good, other.step([(0, 0, 4)]))


def test_layer_cpu_two_threads_on_one_layer_and_cache():
    """Two Python threads step one cache and run one layer at once (the GIL is
    released inside): they serialize on the layer's and the cache's locks, and
    each request's outputs are those of the same steps run one after another."""
    import threading

    cfg = small_cpu_config()
    plan = [((0, 20), slice(0, 20)), ((20, 1), slice(20, 21)), ((21, 1), slice(21, 22)), ((22, 3), slice(22, 25))]
    hidden = {rid: hidden_for(cfg, 25, 30 + rid) for rid in (0, 1)}

    def run(layer, cache, rid, outs):
        for (cached, new), rows in plan:
            batch = cache.step([(rid, cached, new)])
            outs.append(layer.forward(hidden[rid][rows], batch))
            assert cache.num_tokens(rid) == cached + new

    layer = dsalab.DSALayer(cfg, seed=3, device="cpu")
    cache = dsalab.CacheManager(cfg, tokens=128, device="cpu")
    cache.fill(0xFF)
    expect = {rid: [] for rid in (0, 1)}
    for rid in (0, 1):
        run(layer, cache, rid, expect[rid])

    for _ in range(3):
        layer = dsalab.DSALayer(cfg, seed=3, device="cpu")
        cache = dsalab.CacheManager(cfg, tokens=128, device="cpu")
        cache.fill(0xFF)
        got = {rid: [] for rid in (0, 1)}
        errors = []
        start = threading.Barrier(2)

        def worker(rid):
            try:
                start.wait()
                run(layer, cache, rid, got[rid])
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(rid,)) for rid in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for rid in (0, 1):
            assert len(got[rid]) == len(plan)
            for a, b in zip(got[rid], expect[rid]):
                bits_equal(a, b)
        assert sorted(cache.request_ids()) == [0, 1]
