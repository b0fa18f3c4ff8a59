#!/usr/bin/env python3
"""The fastest a LoRA training step of a built-in shape can run on this GPU, from the kernels it
cannot avoid: each frozen projection's forward and input-gradient GEMM (and the forward again
where a checkpointed layer recomputes it), the loss head's two GEMMs, and causal attention's
forward and backward through SDPA, each timed alone at the step's sizes. A second floor adds
LoRA's six skinny GEMMs per target (r=16, all seven projections), run as lorafit runs them.
Compared with `lorafit bench` on the same row, the gap is what the rest of the step costs.
Attention is timed again right after GEMMs, as it runs in a step; the floor takes the figure
measured alone.

usage: gemm_floor.py SHAPE:SEQ:BATCH:CKPT [...]    (CKPT 1: the layer keeps attention and the
residual, so its recomputation runs the q/k/v and gate/up GEMMs again, not attention or o/down)
"""
import sys

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
}
PEAK = 798e12  # bf16 GEMM rate that lorafit's MFU counts against (8192^3 on an H100)
RANK = 16


def timed(fn, reps=20, before=None):
    """Seconds of one fn() on the GPU; with `before`, run ahead of each fn() and not timed."""
    for _ in range(3):
        if before:
            before()
        fn()
    marks = []
    for _ in range(1 if before is None else reps):
        if before:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps if before is None else 1):
            fn()
        end.record()
        marks.append((start, end))
    torch.cuda.synchronize()
    return sum(s.elapsed_time(e) for s, e in marks) / reps / 1e3


def randn(*size):
    return torch.randn(*size, device="cuda", dtype=torch.bfloat16)


def gemm_pair(n, k, m):
    """Seconds of y = x W^T and dx = dy W for W [m, k], and the TFLOP/s of each."""
    x, w, dy = randn(n, k), randn(m, k), randn(n, m)
    fwd = timed(lambda: x @ w.t())
    bwd = timed(lambda: dy @ w)
    return fwd, bwd, 2 * n * k * m / fwd / 1e12, 2 * n * k * m / bwd / 1e12


def lora_seconds(n, k, m):
    """LoRA's extra kernels on one target: x A^T, y += mid (sB)^T; dmid = dy sB, dB, dA, dx +=."""
    x, y, dy, dx = randn(n, k), randn(n, m), randn(n, m), randn(n, k)
    a, b, mid = randn(RANK, k), randn(m, RANK), randn(n, RANK)

    def step():
        torch.mm(x, a.t(), out=mid)
        y.addmm_(mid, b.t())
        dmid = dy @ b
        dy.t() @ mid
        dmid.t() @ x
        dx.addmm_(dmid, a)

    return timed(step)


def attention_seconds(batch, heads, kv, seq, d, before=None):
    """Forward and backward seconds of causal SDPA on q, k, v and the output's gradient as
    [B, H, T, D] views of [B, T, H, D] memory, the layout lorafit's projections give it (cuDNN
    runs the same kernels as fast on contiguous [B, H, T, D]); `before` as timed's."""
    def make(n):
        return randn(batch, seq, n, d).transpose(1, 2).requires_grad_()

    q, k, v = make(heads), make(kv), make(kv)
    g = randn(batch, seq, heads, d).transpose(1, 2)

    def forward():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=kv != heads)
    fwd = timed(forward, before=before)
    both = timed(lambda: torch.autograd.grad(forward(), (q, k, v), g), before=before)
    return fwd, both - fwd


def main():
    big = randn(8192, 8192)
    peak = 2 * 8192**3 / timed(lambda: big @ big, reps=10) / 1e12
    print(f"{torch.cuda.get_device_name()}: bf16 8192^3 GEMM {peak:.0f} TFLOP/s")
    for row in sys.argv[1:]:
        shape, seq, batch, ckpt = row.split(":")
        seq, batch, ckpt = int(seq), int(batch), ckpt == "1"
        c, inter, layers, heads, kv, vocab = SHAPES[shape]
        d, n = c // heads, seq * batch
        projections = {  # name: (in, out), the way lorafit groups them
            "qkv": (c, (heads + 2 * kv) * d), "o": (c, c), "gate_up": (c, 2 * inter),
            "down": (inter, c)}
        print(f"\n== {row}: {n} tokens a step")
        print(f"{'GEMM':10s} {'fwd ms':>7s} {'TF/s':>5s} {'dgrad ms':>8s} {'TF/s':>5s}")
        per_layer = 0.0
        params = 0
        for name, (k, m) in projections.items():
            fwd, bwd, tf, tb = gemm_pair(n, k, m)
            print(f"{name:10s} {fwd * 1e3:7.3f} {tf:5.0f} {bwd * 1e3:8.3f} {tb:5.0f}")
            per_layer += fwd + bwd + (fwd if ckpt and name in ("qkv", "gate_up") else 0.0)
            params += k * m
        afwd, abwd = attention_seconds(batch, heads, kv, seq, d)
        print(f"{'attention':10s} {afwd * 1e3:7.3f}       {abwd * 1e3:8.3f}")
        # As in a step, where GEMMs run just before: the GPU's clocks under their power draw.
        x, w = randn(n, c), randn(2 * inter, c)
        gfwd, gbwd = attention_seconds(batch, heads, kv, seq, d,
                                       before=lambda: [x @ w.t() for _ in range(3)])
        print(f"{' after GEMMs':10s}{gfwd * 1e3:7.3f}       {gbwd * 1e3:8.3f}")
        hfwd, hbwd, _, _ = gemm_pair(n, c, vocab)
        print(f"{'head':10s} {hfwd * 1e3:7.3f}       {hbwd * 1e3:8.3f}")
        lora = sum(lora_seconds(n, k, m) for k, m in
                   [(c, heads * d), (c, kv * d), (c, kv * d), (c, c), (c, inter), (c, inter),
                    (inter, c)])
        floor = layers * (per_layer + afwd + abwd) + hfwd + hbwd
        # lorafit bench's MFU: 4N a token (6N recomputed) and causal attention's 3 (4) passes.
        flops = (6 if ckpt else 4) * (layers * params + c * vocab) + \
            (4 if ckpt else 3) * 2 * seq * c * layers
        for label, seconds in (("base GEMMs + attention", floor),
                               ("  + LoRA's kernels", floor + layers * lora)):
            print(f"floor, {label:24s} {seconds * 1e3:7.1f} ms/step {n / seconds:8.0f} tok/s"
                  f"  MFU {flops * n / seconds / PEAK:.3f}")
        print(f"LoRA's kernels {layers * lora * 1e3:.1f} ms/step")


if __name__ == "__main__":
    main()
