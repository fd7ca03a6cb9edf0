"""Issue 5's baselines, re-measured on the card the kernels run on:
bf16 PyTorch einsum for the indexer logits (prefill T=4096, causal context
4096; FLOPs counted as spec section 8 counts them: 2 * 64 * 128 * visible
keys) and torch.topk(k=2048) over [4096 x 65536] fp32 logits.
Usage (repo root): python3 dev/indexer/torch_baseline.py (needs a GPU and PyTorch)."""
import torch


def time_ms(fn, warmup=3, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    torch.manual_seed(0)
    dev = "cuda"
    T = S = 4096
    q = torch.randn(T, 64, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(S, 128, device=dev, dtype=torch.bfloat16)
    w = torch.randn(T, 64, device=dev, dtype=torch.bfloat16)
    mask = torch.full((T, S), float("-inf"), device=dev).triu(1)

    def logits():
        s = torch.einsum("thd,sd->tsh", q, k).relu()
        return torch.einsum("tsh,th->ts", s, w).float() + mask

    ms = time_ms(logits)
    visible = T * (T + 1) / 2
    print(f"BASELINE torch bf16 einsum indexer logits T=4096 ctx 4096: {ms:.3f} ms, "
          f"{2 * 64 * 128 * visible / ms * 1e-9:.1f} TFLOP/s (causal FLOPs)")
    x = torch.rand(4096, 65536, device=dev)
    ms = time_ms(lambda: torch.topk(x, 2048, dim=-1))
    print(f"BASELINE torch.topk k=2048 [4096 x 65536] fp32: {ms:.3f} ms")
    print("device:", torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
