"""Bad tensors and arguments raise ValueError / TypeError naming the argument,
the rule and the fix; nothing crashes."""
import numpy as np
import pytest
import torch

import dsalab
from test_ops_cpu import fp8_inputs, sparse_inputs


def message_names(exc, name):
    msg = str(exc.value)
    assert name in msg, f"the message does not name {name}: {msg}"
    assert len(msg) > len(name) + 30, f"the message gives no rule or fix: {msg}"


def test_error_hierarchy():
    assert issubclass(dsalab.ShapeError, ValueError) and issubclass(dsalab.ShapeError, dsalab.Error)
    assert issubclass(dsalab.ConfigError, ValueError) and issubclass(dsalab.FileError, ValueError)
    assert issubclass(dsalab.NonFiniteError, ValueError)
    assert issubclass(dsalab.DTypeError, TypeError)
    assert issubclass(dsalab.NoDeviceError, RuntimeError) and issubclass(dsalab.CudaError, RuntimeError)
    assert issubclass(dsalab.OutOfMemoryError, MemoryError)
    assert issubclass(dsalab.CacheError, dsalab.Error)


@pytest.mark.parametrize("case", ["q_f32", "kv_f16", "indices_i64", "q_2d", "q_wrong_dim", "q_last_dim_strided",
                                  "indices_last_dim_strided", "kv_rows_mismatch", "q_list", "kv_none"])
def test_sparse_mla_fwd_bad_tensors(case):
    q, kv, idx = sparse_inputs(T=3, S=50, K=8)
    name = case.split("_")[0]
    err = ValueError
    if case == "q_f32":
        q, err = q.float(), TypeError
    elif case == "kv_f16":
        kv, err = kv.half(), TypeError
    elif case == "indices_i64":
        idx, err = idx.long(), TypeError
    elif case == "q_2d":
        q = q[:, 0, :]
    elif case == "q_wrong_dim":
        q = q[:, :, :512]
    elif case == "q_last_dim_strided":
        q = torch.cat([q, q], dim=2)[:, :, ::2]
    elif case == "indices_last_dim_strided":
        idx = torch.cat([idx, idx], dim=1)[:, ::2]
    elif case == "kv_rows_mismatch":
        kv = kv[:, :100]
    elif case == "q_list":
        q, err = q.tolist(), TypeError
    elif case == "kv_none":
        kv, err = None, TypeError
    with pytest.raises(err) as e:
        dsalab.sparse_mla_fwd(q, kv, idx, 0.1)
    message_names(e, name)


def test_sparse_mla_fwd_bad_indices_rows_and_d_v():
    q, kv, idx = sparse_inputs(T=3, S=50, K=8)
    with pytest.raises(ValueError) as e:
        dsalab.sparse_mla_fwd(q, kv, idx[:2], 0.1)
    message_names(e, "indices")
    with pytest.raises(ValueError):
        dsalab.sparse_mla_fwd(q, kv, idx, 0.1, d_v=577)  # more value dims than kv rows have
    with pytest.raises(ValueError):
        dsalab.sparse_mla_fwd(q, kv, idx, 0.1, d_v=-1)


def test_fp8_ops_reject_fp8_as_another_dtype():
    q, k, ks, w, s, e = fp8_inputs(M=2, N=20)
    with pytest.raises(TypeError) as ex:
        dsalab.fp8_mqa_logits(q.float(), (k, ks), w, s, e)
    message_names(ex, "q")
    with pytest.raises(TypeError) as ex:
        dsalab.fp8_mqa_logits(q, (k.to(torch.bfloat16), ks), w, s, e)
    message_names(ex, "k")
    with pytest.raises(TypeError) as ex:
        dsalab.fp8_mqa_logits(q, (k, ks.double()), w, s, e)
    message_names(ex, "k_scale")
    with pytest.raises(TypeError):
        dsalab.fp8_mqa_logits(q, k, w, s, e)  # kv must be the pair (kv, kv_scale)
    with pytest.raises(ValueError) as ex:
        dsalab.fp8_mqa_logits(q, (k, ks[:5]), w, s, e)
    message_names(ex, "k_scale")


def test_topk_bad_arguments():
    logits = torch.randn(4, 30)
    lengths = torch.full((4,), 30, dtype=torch.int32)
    with pytest.raises(ValueError):
        dsalab.topk(logits, -1, lengths)
    with pytest.raises(TypeError) as e:
        dsalab.topk(logits, 4, lengths.long())
    message_names(e, "lengths")
    with pytest.raises(ValueError) as e:
        dsalab.topk(logits, 4, lengths[:3])
    message_names(e, "lengths")
    with pytest.raises(ValueError) as e:
        dsalab.topk(logits.t(), 4, lengths)
    message_names(e, "logits")


def test_layer_and_config_errors():
    with pytest.raises(ValueError) as e:
        dsalab.load_config(None, num_heads=65)
    assert "num_heads" in str(e.value) and e.value.parameter == "num_heads"
    with pytest.raises(TypeError):
        dsalab.load_config(None, no_such_field=1)
    with pytest.raises(ValueError):
        dsalab.load_config("/nonexistent/config.json")
    with pytest.raises(ValueError):
        dsalab.DSALayer(None, device="tpu")
    if not dsalab.built_with_cuda or not dsalab.cuda_available():
        with pytest.raises(dsalab.NoDeviceError):
            dsalab.DSALayer(None, num_heads=64, device="cuda")


def test_check_error_is_registered():
    assert issubclass(dsalab.CheckError, dsalab.Error) and issubclass(dsalab.CheckError, RuntimeError)


def rope_args(T=3, slots=8):
    cfg = dsalab.load_config(None, kv_cache_dtype="fp8")
    g = torch.Generator().manual_seed(3)
    c_kv = torch.randn((T, 512), generator=g).to(torch.bfloat16)
    k_pe = torch.randn((T, 64), generator=g).to(torch.bfloat16)
    positions = torch.arange(T, dtype=torch.int32)
    slot_mapping = torch.arange(T, dtype=torch.int64)
    return cfg, c_kv, k_pe, positions, slot_mapping, slots


def test_read_only_outputs_are_refused():
    """A tensor the op writes must be writable: a read-only NumPy array (as
    np.frombuffer of bytes gives, or a JAX array) is refused, never written."""
    cfg, c_kv, k_pe, pos, slot, slots = rope_args()
    frozen = bytes([0xFF]) * (slots * 656)
    ro = np.frombuffer(frozen, dtype=np.uint8).reshape(slots, 656)
    assert not ro.flags.writeable
    with pytest.raises(ValueError) as e:
        dsalab.rope_quant_append(cfg, c_kv, k_pe, pos, slot, ro)
    message_names(e, "latent_cache")
    assert "read-only" in str(e.value) and "writable" in str(e.value) and e.value.parameter == "latent_cache"
    assert frozen == bytes([0xFF]) * (slots * 656)
    # The same bytes in a writable array are written.
    rw = ro.copy()
    dsalab.rope_quant_append(cfg, c_kv, k_pe, pos, slot, rw)
    assert (rw[:3] != 0xFF).any() and (rw[3:] == 0xFF).all()
    # An output handed to the extension module directly is checked the same way.
    logits = np.ones((2, 5), dtype=np.float32)
    lengths = np.full(2, 5, dtype=np.int32)
    out = np.frombuffer(bytes(2 * 3 * 4), dtype=np.int32).reshape(2, 3)
    with pytest.raises(ValueError) as e:
        dsalab._dsalab.topk(logits, 3, lengths, out)
    assert "out" in str(e.value) and "read-only" in str(e.value)


def test_16_bit_integers_are_named_as_themselves_where_bf16_is_not_taken():
    """int16 / uint16 tensors are read as bf16 bits (NumPy has no bf16); where the
    op takes something else, the message names the tensor's real dtype."""
    cfg, c_kv, k_pe, pos, slot, slots = rope_args()
    cache = np.full((slots, 656), 0xFF, dtype=np.uint8)
    for bad in (pos.to(torch.int16), pos.numpy().astype(np.uint16)):
        with pytest.raises(TypeError) as e:
            dsalab.rope_quant_append(cfg, c_kv, k_pe, bad, slot, cache)
        msg = str(e.value)
        real = "int16" if isinstance(bad, torch.Tensor) else "uint16"
        assert f"positions has dtype {real} (read as bf16 bits)" in msg and "int32" in msg, msg
        assert e.value.parameter == "positions"
    assert (cache == 0xFF).all()
    # Where bf16 is taken, uint16 bits are still read as bf16 (c_kv as NumPy bits).
    dsalab.rope_quant_append(cfg, c_kv.view(torch.int16).numpy().view(np.uint16), k_pe, pos, slot, cache)
    assert (cache[:3] != 0xFF).any()


def test_huge_k_and_max_context_len_are_shape_errors_before_allocation():
    """Out of the int32 range: dsalab's ShapeError naming the argument, not the
    framework's out-of-memory from allocating the output first."""
    logits = torch.randn(4, 30)
    lengths = torch.full((4,), 30, dtype=torch.int32)
    for k in (2**31, 2**40, -1):
        with pytest.raises(dsalab.ShapeError) as e:
            dsalab.topk(logits, k, lengths)
        assert e.value.parameter == "k" and "2^31 - 1" in str(e.value)
    from test_ops_cpu import paged_inputs
    q, cache, w, ctx, bt, _, _ = paged_inputs()
    with pytest.raises(dsalab.ShapeError) as e:
        dsalab.fp8_paged_mqa_logits(q, cache, w, ctx, bt, None, 2**40)
    assert e.value.parameter == "max_context_len" and "2^31 - 1" in str(e.value)
