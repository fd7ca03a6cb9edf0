"""LayerConfig loading and overrides (dsa::load_config_json_file)."""
import json

import pytest

import dsalab


def test_defaults_and_overrides():
    cfg = dsalab.load_config()
    assert cfg.hidden_size == 7168 and cfg.num_heads == 128 and cfg.index_topk == 2048 and cfg.kv_cache_dtype == "bf16"
    c2 = dsalab.load_config(cfg, num_heads=64, kv_cache_dtype="fp8", o_proj=True, rope_scaling={"factor": 20.0})
    assert c2.num_heads == 64 and c2.kv_cache_dtype == "fp8" and c2.o_proj and c2.rope_scaling.factor == 20.0
    assert cfg.num_heads == 128  # the original is not changed
    assert cfg.latent_dim == 576 and cfg.qk_head_dim == 192 and cfg.softmax_scale > 192 ** -0.5  # yarn mscale > 1


def test_config_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 7168, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
                                "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "index_n_heads": 64,
                                "index_head_dim": 128, "index_topk": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000,
                                "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                                "vocab_size": 129280}))
    cfg = dsalab.load_config(str(path), num_heads=64)
    assert cfg.num_heads == 64 and cfg.hidden_size == 7168
    layer_cfg = dsalab.load_config(path)
    assert layer_cfg == dsalab.load_config()


def test_bad_config_values():
    with pytest.raises(dsalab.ConfigError):
        dsalab.load_config(None, kv_cache_dtype="int4")
    with pytest.raises(TypeError):
        dsalab.load_config(42)
