#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (small files only).

Seeds are the shapes the tests use: the DeepSeek-V3.2 config.json of
tests/data and small variants, safetensors files of every dtype the reader
knows (as the tests write them), an index.json naming the shards of one
layer, request lists from the tests and the README, and a few byte strings
for the batch-metadata decoder. Rerun after changing a format; the fuzzers
also read tests/data directly through these copies.
"""
import json
import os
import shutil
import struct

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
corpus = os.path.join(root, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


# ---- config -----------------------------------------------------------------
shutil.rmtree(corpus, ignore_errors=True)
with open(os.path.join(root, "tests", "data", "deepseek_v32_config.json")) as f:
    full = f.read()
put("config", "deepseek_v32_config.json", full)
small = {
    "hidden_size": 256, "num_attention_heads": 64, "q_lora_rank": 128, "kv_lora_rank": 128,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 64, "v_head_dim": 32, "index_n_heads": 8,
    "index_head_dim": 128, "index_topk": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}
put("config", "small.json", json.dumps(small))
put("config", "small_run.json", json.dumps(dict(small, tokens_per_block=16, kv_cache_dtype="fp8",
                                                indexer_hadamard=False, o_proj=True)))
put("config", "no_rope_scaling.json", json.dumps({k: v for k, v in small.items() if k != "rope_scaling"}))
put("config", "rope_none.json", json.dumps(dict(small, rope_scaling={"type": "none"})))

# ---- safetensors ------------------------------------------------------------
SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)]; 8-byte aligned like dsa::st::Writer."""
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


every = []
for i, (dt, sz) in enumerate(SIZES.items()):
    n = 3
    every.append((f"t.{dt.lower()}", dt, [n], bytes((7 * i + k) % 251 for k in range(n * sz))))
put("safetensors", "every_dtype.safetensors", safetensors(every, {"format": "pt", "producer": "dsalab"}))
put("safetensors", "bf16_2d.safetensors", safetensors([("model.layers.0.self_attn.q_a_proj.weight", "BF16", [4, 8],
                                                         struct.pack("<32H", *[0x3f80 + k for k in range(32)]))]))
put("safetensors", "f32_and_i64.safetensors", safetensors([
    ("x", "F32", [2, 3], struct.pack("<6f", 1, -2, 0.5, float("inf"), float("nan"), 0)),
    ("pos", "I64", [3], struct.pack("<3q", 0, 1, -1)),
    ("empty", "F32", [0, 4], b""),
    ("scalar", "I32", [], struct.pack("<i", 7)),
]))
put("safetensors", "fp8_scale_inv.safetensors", safetensors([
    ("w", "F8_E4M3", [2, 2], bytes([0x38, 0xb8, 0x7e, 0x00])),
    ("w_scale_inv", "F32", [1, 1], struct.pack("<f", 0.5)),
]))
put("safetensors", "u64_big.safetensors", safetensors([("u", "U64", [1], struct.pack("<Q", 2**63))]))
put("safetensors", "header_only.safetensors", safetensors([]))

# ---- checkpoint_index -------------------------------------------------------
names = ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
         "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight", "indexer.wq_b.weight", "indexer.wk.weight",
         "indexer.k_norm.weight", "indexer.k_norm.bias", "indexer.weights_proj.weight"]
shard = "model-00001-of-00001.safetensors"  # the fuzzer writes this shard beside the index
wm = {f"model.layers.0.self_attn.{n}": shard for n in names}
put("checkpoint_index", "one_shard.json", json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}, indent=1))
put("checkpoint_index", "sub_dot_dot.json", json.dumps({"weight_map": dict(wm, **{
    f"model.layers.0.self_attn.{names[0]}": "sub/../" + shard})}))
put("checkpoint_index", "escapes.json", json.dumps({"weight_map": {"a": "../elsewhere.safetensors", "b": "/etc/passwd"}}))
put("checkpoint_index", "missing_shard.json", json.dumps({"weight_map": {f"model.layers.0.self_attn.{names[0]}": "nope.safetensors"}}))

# ---- requests ---------------------------------------------------------------
for i, s in enumerate(["0:4096,32768:1,1024:2", "32768:1", "0:1", "100:3,0:1", "2147483646:1", "0:2147483647",
                       "1:1,1:1,1:1,1:1,1:1,1:1,1:1,1:1"]):
    put("requests", f"list{i}.txt", s)

# ---- batch_metadata ---------------------------------------------------------
# tpb selector, num_blocks, then steps: op, per request id byte, cached (kind, value), new (kind, value).
put("batch_metadata", "decode.bin", bytes([5, 31, 0x12, 0, 4, 10, 4, 1, 1, 4, 20, 4, 1, 2, 0, 1, 0, 0, 0]))
put("batch_metadata", "prefill_then_decode.bin", bytes([4, 8, 0x02, 0, 4, 0, 4, 30, 1, 0x02, 0, 4, 30, 4, 1, 2, 1, 2, 3]))
put("batch_metadata", "free_and_reuse.bin", bytes([1, 3, 0x11, 0, 4, 5, 4, 1, 1, 4, 2, 4, 2, 0, 0, 0x01, 1, 4, 0, 4, 3, 0]))
put("batch_metadata", "hostile.bin", bytes([7, 1, 0x52, 250] + [0xff] * 8 + [2] + [0x7f] + [0xff] * 7 + [3, 5, 1, 0, 3, 0]))
