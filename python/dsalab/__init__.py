"""dsalab: DeepSeek-V3.2's DSA attention layer (CPU reference and Hopper CUDA
backend) from Python. Tensors of any DLPack framework (torch, cupy, numpy, jax)
go in and come out zero copy; outputs are allocated with the caller's framework
and CUDA work runs on the caller's current stream. See docs/python.md.
"""
from . import _dsalab
from ._dsalab import (CacheError, CheckError, ConfigError, CudaError, DTypeError, Error, FileError, NoDeviceError,
                      NonFiniteError, OutOfMemoryError, RopeScaling, ShapeError)
from .layer import Batch, CacheManager, DSALayer, LayerConfig, generate_hidden, load_config
from .ops import (fp8_mqa_logits, fp8_paged_mqa_logits, get_paged_mqa_logits_metadata, rope_quant_append, sparse_mla_fwd,
                  topk)

built_with_cuda = _dsalab.built_with_cuda


def cuda_available():
    """True when this build has the CUDA backend and a usable device."""
    return _dsalab.cuda_available()


__all__ = [
    "Batch", "CacheError", "CacheManager", "CheckError", "ConfigError", "CudaError", "DSALayer", "DTypeError", "Error",
    "FileError", "LayerConfig", "NoDeviceError", "NonFiniteError", "OutOfMemoryError", "RopeScaling", "ShapeError",
    "built_with_cuda", "cuda_available", "fp8_mqa_logits", "fp8_paged_mqa_logits", "generate_hidden",
    "get_paged_mqa_logits_metadata", "load_config", "rope_quant_append", "sparse_mla_fwd", "topk",
]
