"""Bad tensors and arguments raise ValueError / TypeError naming the argument,
the rule and the fix; nothing crashes."""
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
