"""Benchmark of the native CPU backend (not a test): modular_pcgrad on the Llama-3.1-8B per-tensor layout,
scaled down, against the memory-traffic floor, the torch backend and the Python reference loop.

    python bench/native_cpu.py [--scale 20] [--tasks 3 8] [--repeats 5] [--dtype float32]

Floor = (2 * T * N * esize read + N * esize written) / copy bandwidth, where the copy bandwidth is measured
in the same run (median of torch copies of a 256 MiB buffer into a preallocated one, bytes read + written).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mgs_kernels
from mgs_kernels import reference


def llama_sizes(scale: int):
    """Per-tensor sizes of Llama-3.1-8B (291 tensors) with every dimension divided by ``scale``."""
    d = lambda x: max(1, round(x / scale))  # noqa: E731
    h, kv, ff, vocab = d(4096), d(1024), d(14336), d(128256)
    sizes = [vocab * h]  # embed_tokens
    for _ in range(32):
        sizes += [h * h, kv * h, kv * h, h * h, ff * h, ff * h, h * ff, h, h]  # q k v o gate up down 2 norms
    sizes += [h, vocab * h]  # final norm, lm_head
    return sizes


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a large copy into a preallocated buffer (read + write; no page faults counted)."""
    buf = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(buf)
    ms = median_ms(lambda: dst.copy_(buf), repeats, warmup=2)
    return 2 * buf.numel() * 4 / (ms / 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    esize = torch.tensor([], dtype=dtype).element_size()

    from mgs_kernels import _native

    sizes = llama_sizes(args.scale)
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(sizes), 0, out=offsets[1:])
    N = int(offsets[-1])
    bw = copy_bandwidth(1 << 28, args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu isa {_native.cpu().isa()}")
    print(f"layout: Llama-3.1-8B per tensor / {args.scale}: M = {len(sizes)} tensors, N = {N:,} elements, {args.dtype}")
    print(f"copy bandwidth (256 MiB copy_, read + write): {bw / 1e9:.2f} GB/s")
    print(f"{'T':>3} {'floor ms':>9} {'cpu ms':>8} {'% floor':>8} {'torch ms':>9} {'ref ms':>9} "
          f"{'cpu/floor':>9} {'vs torch':>9} {'vs ref':>8}")
    for T in args.tasks:
        g = torch.Generator().manual_seed(T)
        grads = torch.randn(T, N, generator=g).to(dtype)
        order = mgs_kernels.random_order(len(sizes), T, generator=torch.Generator().manual_seed(0))
        out = torch.empty(N, dtype=dtype)
        floor_ms = (2 * T * N * esize + N * esize) / bw * 1e3
        cpu_ms = median_ms(lambda: mgs_kernels.modular_pcgrad(grads, offsets, order=order, out=out, backend="cpu"),
                           args.repeats)
        torch_ms = median_ms(
            lambda: mgs_kernels.modular_pcgrad(grads, offsets, order=order, out=out, backend="torch"),
            max(1, args.repeats // 2))
        ref_ms = median_ms(lambda: reference.modular_pcgrad(grads, offsets, order=order), args.ref_repeats, warmup=0)
        print(f"{T:>3} {floor_ms:>9.1f} {cpu_ms:>8.1f} {100 * floor_ms / cpu_ms:>7.0f}% {torch_ms:>9.1f} "
              f"{ref_ms:>9.1f} {cpu_ms / floor_ms:>8.2f}x {torch_ms / cpu_ms:>8.1f}x {ref_ms / cpu_ms:>7.1f}x")
        del grads, out


if __name__ == "__main__":
    main()
