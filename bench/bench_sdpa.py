"""Scaled-dot-product attention at the SD1.5 UNet's training shapes, per backend (issue 15).

The UNet at 512 px runs 16 transformer blocks; each has a self-attention over the latent pixels and a
cross-attention onto the 77 prompt tokens, 8 heads, in bf16, at batch 15 (one optimizer step):

    tokens x head dim: 4096 x 40 (5 blocks), 1024 x 80 (5), 256 x 160 (5), 64 x 160 (1, the mid block)

For each backend (cuDNN, flash, memory-efficient, and torch's default choice) this times forward and
forward+backward of every such call (q/k/v laid out as diffusers makes them: (batch, tokens, heads, dim)
transposed) with CUDA events, and sums them over one step's calls. An upper bound of what the backend
choice can change in the step; the profile says how much of the step attention is.

    python bench/bench_sdpa.py --json-out sdpa.json
"""

from __future__ import annotations

import argparse
import json

# (query tokens, head dim, blocks) of SD1.5's UNet at 64x64 latents; heads 8, cross-attention keys 77
UNET_ATTENTION = [(4096, 40, 5), (1024, 80, 5), (256, 160, 5), (64, 160, 1)]
HEADS, TEXT_TOKENS = 8, 77


def time_ms(fn, repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(backend: str, batch: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    rows = []
    for tokens, dim, blocks in UNET_ATTENTION:
        for kind, keys in (("self", tokens), ("cross", TEXT_TOKENS)):
            def tensor(length):
                return torch.randn(batch, length, HEADS, dim, device="cuda", dtype=torch.bfloat16
                                   ).transpose(1, 2).requires_grad_()
            q, k, v = tensor(tokens), tensor(keys), tensor(keys)
            grad = torch.randn(batch, HEADS, tokens, dim, device="cuda", dtype=torch.bfloat16)

            def forward():
                return F.scaled_dot_product_attention(q, k, v)

            def forward_backward():
                out = forward()
                torch.autograd.grad(out, (q, k, v), grad)

            row = {"kind": kind, "tokens": tokens, "keys": keys, "head_dim": dim, "calls_per_step": blocks}
            try:
                with sdpa_kernel([backends[backend]]) if backend in backends else _null():
                    row["fwd_ms"] = time_ms(forward, repeats)
                    row["fwd_bwd_ms"] = time_ms(forward_backward, repeats)
                # 4 * b * h * tq * tk * d forward (QK^T and PV), 2.5x that for the backward
                flop = 4 * batch * HEADS * tokens * keys * dim
                row["fwd_tflops"] = flop / (row["fwd_ms"] / 1000) / 1e12
                row["fwd_bwd_tflops"] = 3.5 * flop / (row["fwd_bwd_ms"] / 1000) / 1e12
            except RuntimeError as error:
                row["error"] = str(error).splitlines()[0][:200]
            rows.append(row)
    ok = all("error" not in row for row in rows)
    return {"backend": backend, "rows": rows,
            "step_fwd_ms": sum(r["fwd_ms"] * r["calls_per_step"] for r in rows) if ok else None,
            "step_fwd_bwd_ms": sum(r["fwd_bwd_ms"] * r["calls_per_step"] for r in rows) if ok else None}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backends", default="default,cudnn,flash,efficient")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    results = [measure(backend, args.batch, args.repeats) for backend in args.backends.split(",")]
    print(f"{'backend':<10}{'kind':<6}{'tokens':>7}{'keys':>6}{'dim':>5}{'calls':>6}{'fwd ms':>9}{'f+b ms':>9}"
          f"{'f TF/s':>8}{'f+b TF/s':>9}")
    for result in results:
        for row in result["rows"]:
            if "error" in row:
                print(f"{result['backend']:<10}{row['kind']:<6}{row['tokens']:>7}{row['keys']:>6}{row['head_dim']:>5}"
                      f"  {row['error']}")
                continue
            print(f"{result['backend']:<10}{row['kind']:<6}{row['tokens']:>7}{row['keys']:>6}{row['head_dim']:>5}"
                  f"{row['calls_per_step']:>6}{row['fwd_ms']:>9.3f}{row['fwd_bwd_ms']:>9.3f}{row['fwd_tflops']:>8.0f}"
                  f"{row['fwd_bwd_tflops']:>9.0f}")
    for result in results:
        print(f"{result['backend']}: one step's attention calls, forward {result['step_fwd_ms']} ms, "
              f"forward+backward {result['step_fwd_bwd_ms']} ms")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
