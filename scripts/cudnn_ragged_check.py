#!/usr/bin/env python3
"""Whether PyTorch's cuDNN attention can serve packed records (docs/perf-notes.md, entry 13):
causal attention over records packed into rows (lengths log-normal, median 300, as
scripts/gpu_packing.sh draws them), forward and backward, through varlen flash (what lorafit
runs), cuDNN's ragged layout called directly, and SDPA on nested tensors restricted to cuDNN.
Prints each one's time and its largest difference from flash, relative to flash's largest
value, for the output and the q, k, v gradients. Runs on the GPU machine:
  python3 scripts/cudnn_ragged_check.py [ROWS] [SEQ]
"""
import math
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, DIM = 32, 128


def record_lengths(rows, seq, rng):
    lengths = []
    for _ in range(rows):
        left = seq
        while left > 0:
            n = min(left, max(16, int(rng.lognormvariate(math.log(300), 0.8))))
            lengths.append(n)
            left -= n
    return lengths


def main(rows=4, seq=2048):
    torch.manual_seed(0)
    lengths = record_lengths(rows, seq, random.Random(0))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device="cuda")
    longest, total, scale = max(lengths), rows * seq, 1 / math.sqrt(DIM)
    print(f"{len(lengths)} records in {rows} rows of {seq}, the longest {longest}")

    def leaf():
        return torch.randn(total, HEADS, DIM, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True)

    q, k, v = leaf(), leaf(), leaf()
    grad = torch.randn(total, HEADS, DIM, device="cuda", dtype=torch.bfloat16)

    def flash():
        f = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, True,
                                                    False, scale=scale)
        out, lse, rng_state, unused = f[0], f[1], f[2], f[3]
        return (out,) + tuple(torch.ops.aten._flash_attention_backward(
            grad, q, k, v, out, lse, cu, cu, longest, longest, 0.0, True, rng_state, unused,
            scale=scale))

    def cudnn_ragged():
        f = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, longest, longest, True, 0.0, True, False, scale=scale)
        out, lse, seed, offset = f[0], f[1], f[6], f[7]
        return (out,) + tuple(torch.ops.aten._cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, cu, cu, longest, longest, 0.0, True,
            scale=scale))

    def cudnn_nested():
        offsets = cu.to(torch.int64)

        def nested(x):  # [total, H, D] -> [records, H, (len), D]
            return torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2)

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), is_causal=True,
                                                 scale=scale).transpose(1, 2).values()
        return (out,) + torch.autograd.grad(out, (q, k, v), grad)

    reference = flash()
    for name, run in [("varlen flash", flash), ("cuDNN ragged", cudnn_ragged),
                      ("SDPA nested, cuDNN", cudnn_nested)]:
        try:
            got = run()
            diff = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                    for a, b in zip(got, reference)]
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            start = time.time()
            for _ in range(20):
                run()
            torch.cuda.synchronize()
            ms = (time.time() - start) / 20 * 1e3
            print(f"{name:20s} {ms:9.3f} ms forward and backward; against flash: out "
                  f"{diff[0]:.2e}, dq {diff[1]:.2e}, dk {diff[2]:.2e}, dv {diff[3]:.2e}")
        except Exception as e:  # an unsupported layout is a result too
            print(f"{name:20s} failed: {str(e)[:300]}")


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:3]))
