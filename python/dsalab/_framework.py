"""The caller's framework: where outputs are allocated and which stream ops run on.

Tensors go to the C++ core through DLPack (zero copy). Outputs are allocated
with the framework of the op's first tensor argument, on its device, and the
op runs on that framework's current stream (torch, cupy); the framework
modules are imported only when a tensor of theirs is seen, so dsalab imports
without any of them. For CUDA tensors of other frameworks (JAX, any other
DLPack exporter) dsalab knows no stream: the op runs on the legacy default
stream and the call returns only once that stream is done (done()).
"""
import contextlib
import sys

# DLPack device types (dlpack.h): kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged.
_CPU_TYPES = (1, 3)
_CUDA_TYPES = (2, 13)


def framework(x):
    """'torch', 'cupy', 'numpy', 'jax' or 'dlpack' (any other DLPack exporter)."""
    mod = type(x).__module__.split(".")[0]
    if mod in ("torch", "cupy", "numpy"):
        return mod
    if mod in ("jax", "jaxlib"):
        return "jax"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return None


def require_tensor(x, name):
    fw = framework(x)
    if fw is None:
        raise TypeError(
            f"{name} is a {type(x).__name__}, not a tensor that exports DLPack; "
            "pass a torch, cupy, numpy or jax array")
    return fw


def device(x):
    """('cpu' | 'cuda', index) of a DLPack tensor."""
    try:
        dev_type, dev_id = x.__dlpack_device__()
    except Exception:  # an exporter without __dlpack_device__: the C++ side reports what it is
        return ("cpu", 0)
    dev_type = int(dev_type)
    if dev_type in _CUDA_TYPES:
        return ("cuda", int(dev_id))
    return ("cpu", 0)


def arg(x):
    """What the C++ side receives: torch tensors that require grad are detached (the ops are forward-only)."""
    if framework(x) == "torch" and x.requires_grad:
        return x.detach()
    return x


def stream(x):
    """The caller's current stream on x's device, as an integer (0: the legacy default stream)."""
    fw = framework(x)
    kind, index = device(x)
    if kind != "cuda":
        return 0
    if fw == "torch":
        import torch
        return int(torch.cuda.current_stream(x.device).cuda_stream)
    if fw == "cupy":
        import cupy
        with cupy.cuda.Device(index):
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


def done(x, stream):
    """After an op on x's device: where x's framework has no stream dsalab knows
    (JAX, other DLPack exporters on CUDA), waits for the op's stream. Outputs were
    allocated on torch's / cupy's current stream and the inputs were kept alive
    only for the call, so the caller must not see the result before the op ends."""
    kind, index = device(x)
    if kind == "cuda" and framework(x) not in ("torch", "cupy"):
        from . import _dsalab
        _dsalab.synchronize(index, stream)


def device_guard(x):
    """Makes x's CUDA device current for the call (torch and cupy track it per thread)."""
    fw = framework(x)
    kind, index = device(x)
    if kind != "cuda":
        return contextlib.nullcontext()
    if fw == "torch":
        import torch
        return torch.cuda.device(x.device)
    if fw == "cupy":
        import cupy
        return cupy.cuda.Device(index)
    return contextlib.nullcontext()


# dsalab dtype names -> (torch attribute, numpy/cupy dtype). NumPy and CuPy have
# no bfloat16: bf16 outputs come back as uint16 arrays holding the bf16 bits.
_DTYPES = {"bf16": ("bfloat16", "uint16"), "f32": ("float32", "float32"), "i32": ("int32", "int32")}


def _allocator_for_cuda(index):
    for mod in ("torch", "cupy"):
        if mod in sys.modules or _importable(mod):
            return mod
    raise TypeError(
        f"outputs on CUDA device {index} are allocated with torch or cupy, and neither is installed; "
        "install one of them (pip install torch or cupy)")


def _importable(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def empty(like, shape, dtype):
    """An uninitialised tensor of dtype ('bf16' | 'f32' | 'i32') in like's framework and on like's device."""
    shape = tuple(max(0, int(s)) for s in shape)
    fw = framework(like)
    kind, index = device(like)
    if fw in ("jax", "dlpack"):
        # Frameworks without in-place writes (JAX) or unknown ones: allocate with
        # NumPy on the CPU, torch or cupy on CUDA; finish() hands the result back.
        fw = "numpy" if kind == "cpu" else _allocator_for_cuda(index)
    if fw == "torch":
        import torch
        dev = like.device if framework(like) == "torch" else torch.device(kind, index)
        return torch.empty(shape, dtype=getattr(torch, _DTYPES[dtype][0]), device=dev)
    if fw == "cupy":
        import cupy
        with cupy.cuda.Device(index):
            return cupy.empty(shape, dtype=_DTYPES[dtype][1])
    import numpy
    return numpy.empty(shape, dtype=_DTYPES[dtype][1])


def finish(like, out):
    """out in like's framework (zero copy through DLPack where it was allocated with another)."""
    if framework(like) == "jax":
        import jax
        bf16 = str(getattr(out, "dtype", "")) == "uint16"
        y = jax.dlpack.from_dlpack(out)
        if bf16 and str(getattr(like, "dtype", "")) == "bfloat16":
            import jax.numpy as jnp
            y = y.view(jnp.bfloat16)
        return y
    return out
