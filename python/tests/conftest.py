"""Shared helpers of the dsalab pytest suite: a small layer configuration, the
dsa command line (DSA_CLI, set by CTest) and a minimal safetensors reader for
its dumps."""
import json
import os
import struct
import subprocess

import numpy as np
import pytest
import torch

import dsalab


def small_cpu_config(**overrides):
    """tests/cpu/small_layer_config.h: every width scaled down, RoPE and the 128-wide indexer heads kept."""
    base = dict(hidden_size=256, num_heads=64, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, v_head_dim=32,
                index_n_heads=8, index_topk=64, tokens_per_block=16)
    base.update(overrides)
    return dsalab.load_config(None, **base)


def cli_flags(cfg):
    """The dsa command-line flags that give cfg (the widths the tests change)."""
    flags = ["--hidden-size", cfg.hidden_size, "--num-heads", cfg.num_heads, "--q-lora-rank", cfg.q_lora_rank,
             "--kv-lora-rank", cfg.kv_lora_rank, "--qk-nope-head-dim", cfg.qk_nope_head_dim, "--v-head-dim",
             cfg.v_head_dim, "--index-n-heads", cfg.index_n_heads, "--topk", cfg.index_topk, "--tokens-per-block",
             cfg.tokens_per_block, "--kv-cache-dtype", cfg.kv_cache_dtype]
    if cfg.o_proj:
        flags.append("--o-proj")
    return [str(f) for f in flags]


@pytest.fixture
def cli():
    path = os.environ.get("DSA_CLI")
    if not path or not os.path.exists(path):
        pytest.skip("DSA_CLI (the dsa binary) is not set; CTest sets it")
    return path


def run_cli(cli, *args):
    r = subprocess.run([cli, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"dsa {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


_ST_DTYPES = {"BF16": (np.uint16, torch.bfloat16), "F32": (np.float32, None), "I32": (np.int32, None),
              "I64": (np.int64, None), "F8_E4M3": (np.uint8, torch.float8_e4m3fn), "U8": (np.uint8, None)}


def read_safetensors(path):
    """{name: torch tensor} from a .safetensors file (8-byte header length, JSON header, raw bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, view = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        arr = np.frombuffer(data[base + begin:base + end], dtype=np_dtype).reshape(info["shape"]).copy()
        t = torch.from_numpy(arr)
        out[name] = t.view(view) if view is not None else t
    return out


def bits_equal(a, b):
    """Bitwise equality of two tensors of the same dtype (NaN patterns included)."""
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"dtypes differ: {a.dtype} vs {b.dtype}"
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    diff = (a.contiguous().view(view) != b.contiguous().view(view))
    if diff.any():
        first = tuple(int(i) for i in diff.nonzero()[0])
        raise AssertionError(f"{int(diff.sum())} of {diff.numel()} elements differ; first at {first}: {a[first]} vs {b[first]}")
