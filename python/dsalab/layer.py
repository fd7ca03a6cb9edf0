"""The layer configuration, the paged caches with their batch metadata, and the
whole layer (the C++ dsa::LayerConfig, dsa::CacheManager +
build_batch_metadata, dsa::ref::layer_forward / dsa::cuda::CudaLayer)."""
import os

from . import _dsalab as _C
from . import _framework as _fw

LayerConfig = _C.LayerConfig
Batch = _C.Batch


def load_config(config=None, **overrides):
    """A validated LayerConfig from a LayerConfig (copied), a config.json path
    (Hugging Face key names, as dsa::load_config_json_file) or None (the
    DeepSeek-V3.2 defaults), with LayerConfig fields overridden by keyword:
    num_heads=64, index_topk=512, kv_cache_dtype="fp8", o_proj=True,
    rope_scaling={"factor": 40.0}, ...
    """
    if config is None:
        cfg = _C.LayerConfig()
    elif isinstance(config, _C.LayerConfig):
        cfg = _C.config_from_json_text(config.to_json(), "LayerConfig")
    elif isinstance(config, (str, os.PathLike)):
        cfg = _C.load_config_json_file(os.fspath(config))
    else:
        raise TypeError(f"config is a {type(config).__name__}; pass a dsalab.LayerConfig, a config.json path or None")
    for key, value in overrides.items():
        if key.startswith("_") or not hasattr(cfg, key) or key in ("qk_head_dim", "latent_dim", "softmax_scale"):
            raise TypeError(f"'{key}' is not a LayerConfig field; the fields are: {', '.join(_fields())}")
        if key == "rope_scaling" and isinstance(value, dict):
            rs = cfg.rope_scaling
            for k, v in value.items():
                if k.startswith("_") or not hasattr(rs, k):
                    raise TypeError(f"'rope_scaling.{k}' is not a RopeScaling field")
                setattr(rs, k, v)
            cfg.rope_scaling = rs
        else:
            setattr(cfg, key, value)
    cfg.validate()
    return cfg


def _fields():
    return [k for k in dir(_C.LayerConfig) if not k.startswith("_")
            and k not in ("validate", "to_json", "qk_head_dim", "latent_dim", "softmax_scale")]


def _device(device):
    """('cpu' | 'cuda', index) from "cpu", "cuda", "cuda:N", a torch.device or None
    (None: CUDA device 0 when dsalab.cuda_available(), else the CPU)."""
    if device is None:
        return ("cuda", 0) if _C.cuda_available() else ("cpu", 0)
    s = str(device)
    if s == "cpu":
        return ("cpu", 0)
    if s == "cuda":
        return ("cuda", 0)
    if s.startswith("cuda:") and s[5:].isdigit():
        return ("cuda", int(s[5:]))
    raise _C.ConfigError(f"device '{s}' is not one dsalab runs on; pass 'cpu', 'cuda' or 'cuda:N'")


def _requests(requests):
    out = []
    for r in requests:
        if isinstance(r, dict):
            out.append((int(r["id"]), int(r.get("cached", 0)), int(r.get("new", r.get("num_new", 1)))))
        else:
            rid, cached, new = r
            out.append((int(rid), int(cached), int(new)))
    return out


class CacheManager(_C.CacheManager):
    """The paged latent and indexer caches of one or more layers (dsa::CacheManager).

    CacheManager(config, tokens=N | num_blocks=N, num_layers=1, device="cpu" | "cuda" | "cuda:N" | None)

    Requests: add_request(id, max_tokens=0), reserve(id, tokens), extend(id, n),
    free_request(id), num_tokens(id), block_table(id), free_blocks, ...
    step([(id, cached, new), ...]) reserves room for the step (all-or-nothing:
    on CacheError the cache is as before) and returns its Batch metadata;
    prefill, decode, mixed, chunked prefill and next_n are all just different
    (cached, new) lists. latent_cache(layer) / indexer_cache(layer) are DLPack
    views of the pools (zero copy; torch.from_dlpack(...)).
    """

    def __init__(self, config=None, tokens=None, num_blocks=None, num_layers=1, device="cpu"):
        cfg = load_config(config)
        kind, index = _device(device)
        super().__init__(cfg, tokens, num_blocks, int(num_layers), kind == "cuda", index)

    @property
    def device(self):
        return f"cuda:{self.device_index}" if self.is_cuda else "cpu"

    def step(self, requests):
        """Reserves room for the step's requests (adding new ids) and returns its Batch."""
        return super().step(_requests(requests))

    def metadata(self, requests):
        """The Batch of requests that already hold room (no reservation)."""
        return super().metadata(_requests(requests))


class DSALayer:
    """One DeepSeek-V3.2 DSA attention layer.

    DSALayer(config=None | LayerConfig | "config.json", weights=None | "file.safetensors" |
             "model.safetensors.index.json", seed=1, layer=0, device="cuda" | "cpu" | "cuda:N" | None,
             **overrides)

    weights=None: synthetic weights from seed (dsa::generate_weights: the same as
    `dsa run --seed S`, so outputs compare bit for bit). device="cpu" runs the CPU
    reference; "cuda" the CUDA backend (hidden read in place, the output written on
    the caller's current stream). overrides are LayerConfig fields (num_heads=64, ...).
    """

    def __init__(self, config=None, weights=None, seed=1, layer=0, device=None, **overrides):
        self.config = load_config(config, **overrides)
        kind, index = _device(device)
        self.device = f"cuda:{index}" if kind == "cuda" else "cpu"
        self._layer = _C.Layer(self.config, os.fspath(weights) if weights is not None else "", int(seed), int(layer),
                               kind == "cuda", index)

    @property
    def output_width(self):
        """H * v_head_dim, or hidden_size with o_proj."""
        return self._layer.output_width

    def forward(self, hidden, batch, cache_layer=0, trace=False, trace_logits=False):
        """hidden [T, hidden_size] bf16 (any framework; uint16 bf16 bits for NumPy/CuPy) on
        the layer's device, T = batch.num_tokens, in the batch's token order.
        Returns the output [T, H * v_head_dim] (or [T, hidden_size] with o_proj) bf16
        in hidden's framework; with trace=True, (output, dict of NumPy intermediates
        as dsa run --dump names them; idx_logits too with trace_logits=True).

        On CUDA the step is queued on hidden's framework's current stream and the
        call returns without waiting for it, except that it first waits on the host
        for this layer's previous step: the layer uploads each step's metadata
        synchronously and reuses (or reallocates) its GPU buffers, which the previous
        step's kernels may still be reading on a non-blocking stream. Calls from
        several threads on one layer (or one cache) run one at a time."""
        _fw.require_tensor(hidden, "hidden")
        if not isinstance(batch, _C.Batch):
            raise TypeError(f"batch is a {type(batch).__name__}; pass the Batch that CacheManager.step() returns")
        with _fw.device_guard(hidden):
            out = _fw.empty(hidden, (batch.num_tokens, self.output_width), "bf16")
            stream = _fw.stream(hidden)
            tr = self._layer.forward(_fw.arg(hidden), batch, out, stream, int(cache_layer), bool(trace),
                                     bool(trace_logits))
            _fw.done(hidden, stream)
        out = _fw.finish(hidden, out)
        return (out, tr) if trace else out

    __call__ = forward


def generate_hidden(config, tokens, seed):
    """dsa::generate_hidden: [tokens, hidden_size] bf16 bits as a NumPy uint16 array
    (`dsa run` uses seed + 1000 for its hidden states: generate_hidden(cfg, T, S + 1000))."""
    return _C.generate_hidden(load_config(config), int(tokens), int(seed))
