"""The layer's stages as standalone ops, with the anchors' signatures.

sparse_mla_fwd is FlashMLA's flash_mla_sparse_fwd; fp8_mqa_logits and
fp8_paged_mqa_logits are DeepGEMM's; topk and rope_quant_append are the
layer's own stages. Each op runs where its tensors live (all on the CPU: the
reference; all on one CUDA device: the CUDA backend, on the caller's current
stream), returns outputs allocated with the caller's framework, and checks
every tensor before any work (ShapeError / ValueError, DTypeError / TypeError).
The semantics are those of include/dsa/ops.h.
"""
from . import _dsalab as _C
from . import _framework as _fw

_INT32_MAX = 2**31 - 1


def _shape_error(message, parameter):
    e = _C.ShapeError(message)
    e.parameter = parameter
    return e


def _dim(x, i):
    """x.shape[i] where x has that many dimensions, else 0: outputs are sized from
    the inputs before the C++ side checks them, and a wrong rank must reach that
    check (which names the tensor and the rule) rather than fail here."""
    shape = getattr(x, "shape", ())
    try:
        return int(shape[i]) if len(shape) > i else 0
    except (TypeError, ValueError):
        return 0


def sparse_mla_fwd(q, kv, indices, sm_scale, d_v=512):
    """Sparse MLA forward, as FlashMLA's flash_mla_sparse_fwd.

    q [s_q, h_q, 576] bf16; kv [s_kv, 576] or [s_kv, 1, 576] bf16; indices
    [s_q, topk] or [s_q, 1, topk] int32 (-1 or >= s_kv: skipped).
    Returns (out [s_q, h_q, d_v] bf16, max_logits [s_q, h_q] f32, lse [s_q, h_q] f32),
    lse the natural-log sum-exp of the scaled scores (+inf and out = 0 for a row
    with no valid index; max_logits -inf there).
    """
    _fw.require_tensor(q, "q")
    s_q, h_q = _dim(q, 0), _dim(q, 1)
    with _fw.device_guard(q):
        out = _fw.empty(q, (s_q, h_q, d_v), "bf16")
        max_logits = _fw.empty(q, (s_q, h_q), "f32")
        lse = _fw.empty(q, (s_q, h_q), "f32")
        stream = _fw.stream(q)
        _C.sparse_mla_fwd(_fw.arg(q), _fw.arg(kv), _fw.arg(indices), float(sm_scale), int(d_v), out, max_logits, lse,
                          stream)
        _fw.done(q, stream)
    return _fw.finish(q, out), _fw.finish(q, max_logits), _fw.finish(q, lse)


def fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True):
    """Indexer logits, as DeepGEMM's fp8_mqa_logits.

    q [M, H, 128] float8_e4m3fn (or uint8 bits); kv = (k [N, 128] float8_e4m3fn,
    k_scale [N] f32); weights [M, H] f32; cu_seq_len_k_start / _end [M] int32.
    Returns logits [M, N] f32: k_scale[n] * sum_h weights[m, h] * relu(q[m, h] . k[n])
    for n in [start[m], end[m]) (both clamped to [0, N]); -inf at and after
    end[m] always; before start[m] -inf when clean_logits, else the logit itself.
    """
    _fw.require_tensor(q, "q")
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise TypeError("kv must be the pair (kv, kv_scale): the fp8 keys [N, 128] and their f32 scales [N], "
                        "as DeepGEMM's fp8_mqa_logits takes them")
    k, k_scale = kv
    with _fw.device_guard(q):
        logits = _fw.empty(q, (_dim(q, 0), _dim(k, 0)), "f32")
        stream = _fw.stream(q)
        _C.fp8_mqa_logits(_fw.arg(q), _fw.arg(k), _fw.arg(k_scale), _fw.arg(weights), _fw.arg(cu_seq_len_k_start),
                          _fw.arg(cu_seq_len_k_end), logits, bool(clean_logits), stream)
        _fw.done(q, stream)
    return _fw.finish(q, logits)


def get_paged_mqa_logits_metadata(context_lens, block_size, num_sms):
    """DeepGEMM's scheduling metadata for fp8_paged_mqa_logits. dsalab's kernel
    schedules itself, so there is none: returns None, which fp8_paged_mqa_logits
    accepts (as it accepts DeepGEMM's tensor, unused), so calling code keeps its shape."""
    return None


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                         clean_logits=True):
    """Indexer logits over the paged indexer cache, as DeepGEMM's fp8_paged_mqa_logits.

    q [B, next_n, H, 128] float8_e4m3fn (or uint8 bits); kv_cache
    [num_blocks, block_size, 1, 132] or [num_blocks, block_size * 132] uint8 (per
    block: block_size x 128 fp8 keys, then block_size f32 scales); weights
    [B * next_n, H] f32; context_lens [B] int32; block_table [B, max_blocks] int32;
    schedule_meta: ignored (see get_paged_mqa_logits_metadata).
    Returns logits [B * next_n, max_context_len] f32; row b * next_n + j sees
    positions [0, context_lens[b] - next_n + j + 1) (clamped to max_context_len
    and cut at the first block-table entry outside the cache), -inf after it
    whatever clean_logits says (accepted for DeepGEMM's signature).
    max_context_len in [0, 2^31 - 1].
    """
    del schedule_meta  # accepted for DeepGEMM's signature; dsalab's kernel needs none
    _fw.require_tensor(q, "q")
    max_context_len = int(max_context_len)
    # Before the logits are allocated: a huge value must be dsalab's error, not the framework's out-of-memory.
    if max_context_len > _INT32_MAX:
        raise _shape_error(f"fp8_paged_mqa_logits: max_context_len = {max_context_len} exceeds 2^31 - 1 (positions are "
                           "int32); split the work", "max_context_len")
    with _fw.device_guard(q):
        logits = _fw.empty(q, (_dim(q, 0) * _dim(q, 1), max_context_len), "f32")
        stream = _fw.stream(q)
        _C.fp8_paged_mqa_logits(_fw.arg(q), _fw.arg(kv_cache), _fw.arg(weights), _fw.arg(context_lens),
                                _fw.arg(block_table), max_context_len, logits, bool(clean_logits), stream)
        _fw.done(q, stream)
    return _fw.finish(q, logits)


def topk(logits, k, lengths):
    """Top-k per row: logits [T, S] f32, lengths [T] int32 (candidates [0, lengths[t])).

    Returns [T, k] int32: positions of the min(k, length) largest, ties to the lower
    position, in ascending position order, then -1. NaN ranks as -inf.
    """
    _fw.require_tensor(logits, "logits")
    k = int(k)
    # Before the output is allocated: a huge k must be dsalab's error, not the framework's out-of-memory.
    if not 0 <= k <= _INT32_MAX:
        raise _shape_error(f"topk: k = {k} must be in [0, 2^31 - 1] (DeepSeek-V3.2: 2048)", "k")
    with _fw.device_guard(logits):
        out = _fw.empty(logits, (_dim(logits, 0), k), "i32")
        stream = _fw.stream(logits)
        _C.topk(_fw.arg(logits), k, _fw.arg(lengths), out, stream)
        _fw.done(logits, stream)
    return _fw.finish(logits, out)


def rope_quant_append(config, c_kv, k_pe, positions, slot_mapping, latent_cache):
    """The layer's latent-cache append, in place: k_pe gets the interleaved MLA RoPE
    at positions (config's rope_theta and yarn scaling), then [c_kv | k_pe] is
    written at each token's slot, as bf16 or in the 656-byte fp8 form
    (config.kv_cache_dtype).

    config: a LayerConfig (or a config.json path); c_kv [T, 512] bf16; k_pe
    [T, 64] bf16; positions [T] int32; slot_mapping [T] int64 (slots outside the
    cache are skipped); latent_cache [num_slots, 576] bf16 or [num_slots, 656] uint8
    (CacheManager.latent_cache() is one; it must be writable). Returns None.
    """
    from .layer import load_config
    cfg = config if isinstance(config, _C.LayerConfig) else load_config(config)
    _fw.require_tensor(c_kv, "c_kv")
    with _fw.device_guard(c_kv):
        stream = _fw.stream(c_kv)
        _C.rope_quant_append(cfg, _fw.arg(c_kv), _fw.arg(k_pe), _fw.arg(positions), _fw.arg(slot_mapping),
                             _fw.arg(latent_cache), stream)
        _fw.done(c_kv, stream)
