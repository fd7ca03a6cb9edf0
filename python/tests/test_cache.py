"""CacheManager and the batch metadata of every kind of step: prefill, decode,
mixed, chunked prefill, next_n, and a step that does not fit."""
import numpy as np
import pytest

import dsalab
from conftest import small_cpu_config


def expect_metadata(cache, batch, requests):
    tpb = cache.tokens_per_block
    pos, slots, tok_req, offsets = [], [], [], [0]
    for r, (rid, cached, new) in enumerate(requests):
        table = cache.block_table(rid)
        for i in range(new):
            p = cached + i
            pos.append(p)
            slots.append(int(table[p // tpb]) * tpb + p % tpb)
            tok_req.append(r)
        offsets.append(offsets[-1] + new)
    assert batch.requests == [tuple(r) for r in requests]
    assert batch.num_tokens == len(pos) and batch.num_requests == len(requests)
    np.testing.assert_array_equal(batch.positions, pos)
    np.testing.assert_array_equal(batch.visible_end, np.array(pos) + 1)
    np.testing.assert_array_equal(batch.slot_mapping, slots)
    np.testing.assert_array_equal(batch.token_request, tok_req)
    np.testing.assert_array_equal(batch.token_offsets, offsets)
    np.testing.assert_array_equal(batch.seq_lens, [c + n for _, c, n in requests])
    mb = max(-(-(c + n) // tpb) for _, c, n in requests)
    assert batch.block_table.shape == (len(requests), mb) and batch.block_table.dtype == np.int32
    for r, (rid, c, n) in enumerate(requests):
        used = -(-(c + n) // tpb)
        np.testing.assert_array_equal(batch.block_table[r, :used], cache.block_table(rid)[:used])
        assert (batch.block_table[r, used:] == -1).all()
    assert batch.positions.dtype == np.int32 and batch.slot_mapping.dtype == np.int64


def test_prefill_decode_mixed_chunked_next_n():
    cfg = small_cpu_config()
    cache = dsalab.CacheManager(cfg, tokens=16 * 20, device="cpu")
    assert cache.num_blocks == 20 and cache.free_blocks == 20 and cache.tokens_per_block == 16
    steps = [
        [(0, 0, 20)],                 # prefill
        [(0, 20, 1)],                 # decode
        [(1, 0, 5), (0, 21, 1)],      # mixed: a new request's prefill beside a decode
        [(2, 0, 16)],                 # chunked prefill, first chunk
        [(2, 16, 16)],                # ... second chunk
        [(0, 22, 2), (1, 5, 2)],      # next_n = 2 (speculative)
    ]
    for reqs in steps:
        batch = cache.step(reqs)
        expect_metadata(cache, batch, reqs)
    assert cache.num_tokens(0) == 24 and cache.num_tokens(1) == 7 and cache.num_tokens(2) == 32
    assert cache.request_ids() == [0, 1, 2]
    assert cache.used_blocks == 2 + 1 + 2 and cache.free_blocks == 15
    cache.free_request(2)
    assert cache.free_blocks == 17 and not cache.has_request(2)


def test_dict_requests_and_explicit_reservations():
    cache = dsalab.CacheManager(small_cpu_config(), num_blocks=8)
    cache.add_request(7, max_tokens=40)
    cache.reserve(7, 33)
    assert cache.num_tokens(7) == 33 and len(cache.block_table(7)) == 3 and cache.max_tokens(7) == 40
    batch = cache.metadata([{"id": 7, "cached": 30, "new": 3}])
    assert list(batch.positions) == [30, 31, 32]
    with pytest.raises(dsalab.CacheError):
        cache.extend(7, 10)  # past max_tokens


def test_overflow_is_a_cache_error_and_leaves_the_cache_as_it_was():
    cache = dsalab.CacheManager(small_cpu_config(), tokens=64)  # 4 blocks of 16
    cache.step([(0, 0, 30)])
    before = (cache.free_blocks, cache.request_ids(), cache.num_tokens(0), list(cache.block_table(0)))
    with pytest.raises(dsalab.CacheError) as e:
        cache.step([(0, 30, 2), (1, 0, 40)])  # 1 more block for 0 fits, 3 for request 1 do not
    assert "block" in str(e.value)
    assert (cache.free_blocks, cache.request_ids(), cache.num_tokens(0), list(cache.block_table(0))) == before


def test_bad_cache_arguments():
    cfg = small_cpu_config()
    with pytest.raises(ValueError):
        dsalab.CacheManager(cfg)  # neither tokens nor num_blocks
    with pytest.raises(ValueError):
        dsalab.CacheManager(cfg, tokens=10, num_blocks=2)
    with pytest.raises(ValueError):
        dsalab.CacheManager(cfg, tokens=0)
    cache = dsalab.CacheManager(cfg, tokens=64)
    with pytest.raises(ValueError):
        cache.step([(0, 0, 0)])  # num_new must be >= 1
    with pytest.raises(ValueError):
        cache.step([])
    with pytest.raises(dsalab.CacheError):
        cache.block_table(99)


def test_pool_views_are_zero_copy():
    cfg = small_cpu_config()
    cache = dsalab.CacheManager(cfg, tokens=64)
    cache.fill(0x3C)
    lat = np.from_dlpack(cache.indexer_cache())
    assert lat.shape == (4, 16 * 132) and lat.dtype == np.uint8 and (lat == 0x3C).all()
    cache.fill(0x01)
    assert (lat == 0x01).all()
