"""Independent float64 torch computations of the ops (tests only)."""
import math

import torch


def sparse_mla(q, kv, indices, sm_scale, d_v=512):
    """q [T, H, D], kv [S, D], indices [T, K]: (out [T, H, d_v], max [T, H], lse [T, H]) in float64."""
    q = q.double()
    kv = kv.reshape(kv.shape[0], -1).double()
    idx = indices.reshape(indices.shape[0], -1).long()
    T, H, _ = q.shape
    S = kv.shape[0]
    out = torch.zeros(T, H, d_v, dtype=torch.float64)
    mx = torch.full((T, H), -math.inf, dtype=torch.float64)
    lse = torch.full((T, H), math.inf, dtype=torch.float64)
    for t in range(T):
        valid = idx[t][(idx[t] >= 0) & (idx[t] < S)]
        if valid.numel() == 0:
            continue
        k = kv[valid]                       # [n, D]
        s = (q[t] @ k.T) * sm_scale         # [H, n]
        m = s.max(dim=1).values
        p = torch.exp(s - m[:, None])
        z = p.sum(dim=1)
        out[t] = (p / z[:, None]) @ k[:, :d_v]
        mx[t] = m
        lse[t] = m + torch.log(z)
    return out, mx, lse


def mqa_logits(q, k, k_scale, w, start, end):
    """q [M, H, 128] fp8, k [N, 128] fp8: [M, N] float64, -inf outside [start, end)."""
    qd, kd = q.double(), k.double()
    s = torch.relu(torch.einsum("mhd,nd->mhn", qd, kd))
    logits = torch.einsum("mhn,mh->mn", s, w.double()) * k_scale.double()[None, :]
    n = torch.arange(k.shape[0])[None, :]
    visible = (n >= start.long()[:, None].clamp(0, k.shape[0])) & (n < end.long()[:, None].clamp(0, k.shape[0]))
    return torch.where(visible, logits, torch.tensor(-math.inf, dtype=torch.float64))


def topk(logits, k, lengths):
    T, S = logits.shape
    out = torch.full((T, k), -1, dtype=torch.int32)
    for t in range(T):
        n = max(0, min(int(lengths[t]), S))
        vals = [(-math.inf if math.isnan(v) else v) for v in logits[t, :n].tolist()]
        order = sorted(range(n), key=lambda i: (-vals[i], i))[:k]
        order.sort()
        out[t, :len(order)] = torch.tensor(order, dtype=torch.int32)
    return out


def yarn_inv_freq(cfg):
    """Spec section 6 in float64."""
    rope = cfg.qk_rope_head_dim
    theta = cfg.rope_theta
    f = [theta ** (-2.0 * i / rope) for i in range(rope // 2)]
    rs = cfg.rope_scaling
    if rs.type != "yarn":
        return f

    def d(r):
        return rope * math.log(rs.original_max_position_embeddings / (2 * math.pi * r)) / (2 * math.log(theta))

    low = max(math.floor(d(rs.beta_fast)), 0)
    high = min(math.ceil(d(rs.beta_slow)), rope - 1)
    out = []
    for i in range(rope // 2):
        ramp = min(max((i - low) / max(high - low, 1e-3), 0.0), 1.0)
        out.append(f[i] / rs.factor * ramp + f[i] * (1 - ramp))
    return out


def rope_interleaved(x, positions, inv_freq):
    """x [T, rope] float64, pairs (2i, 2i+1) rotated by positions[t] * inv_freq[i]."""
    x = x.double().clone()
    f = torch.tensor(inv_freq, dtype=torch.float64)
    ang = positions.double()[:, None] * f[None, :]
    c, s = torch.cos(ang), torch.sin(ang)
    a, b = x[:, 0::2].clone(), x[:, 1::2].clone()
    x[:, 0::2] = a * c - b * s
    x[:, 1::2] = a * s + b * c
    return x
