"""Benchmark of the native CPU backend (not a test): modular_pcgrad on the Llama-3.1-8B per-tensor layout,
scaled down, against the memory-traffic floor, the torch backend and the Python reference loop.

    python bench/native_cpu.py [--scale 20 [10 40 ...]] [--tasks 3 8] [--repeats 5] [--dtype float32]

``cpu ms`` is the fused native call with the default (cache-blocked) schedule, or with $MGS_CPU_CACHE_BYTES
when set; ``2pass ms`` the same call with MGS_CPU_CACHE_BYTES=0 (Gram over all chunks, solve, combine).

Floor = (2 * T * N * esize read + N * esize written) / copy bandwidth, where the copy bandwidth is measured
in the same run (median of torch copies of a 256 MiB buffer into a preallocated one, bytes read + written).

    python bench/native_cpu.py --step [--numel 1e7] [--tasks 3] [--repeats 5]

``--step``: one optimizer step on a flat model with the per-tensor layout of Llama-3.1-8B scaled to about
``--numel`` fp32 elements (bench/layouts.py), task rows filled with random values, every slot touched:
``surgery.step(AdamW, max_grad_norm=1.0)`` with backend "cpu" (Gram pass + one fused combine/clip/AdamW pass)
against ``resolve()`` + ``clip_grad_norm_`` + torch AdamW (foreach=False, the CPU default, and foreach=True).
Bytes per element are the minimal traffic of each pass sequence (fp32, 4 bytes per element access).
"""

from __future__ import annotations

import argparse
import os
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


def step_bytes_per_elem(T: int):
    """Element accesses per parameter element (x 4 bytes) of each step variant, counted pass by pass."""
    gram = T                       # Gram: read T rows
    fused = T + 3 + 3              # fused pass: read T rows + p, m, v; write p, m, v
    combine = T + 1                # combine: read T rows, write the gradient
    clip = 1 + 2                   # clip_grad_norm_: norm (read g), scale g in place (read + write)
    # torch AdamW, one kernel per op: p.mul_ (2), m.lerp_(g) (3), v.mul_ (2), v.addcmul_(g, g) (3),
    # sqrt (2), / bc2 (2), + eps (2), p.addcdiv_(m, denom) (4)
    adamw = 2 + 3 + 2 + 3 + 2 + 2 + 2 + 4
    # foreach=True runs the same ops (on lists), with the same traffic per element
    return {"fused": 4 * (gram + fused), "unfused": 4 * (gram + combine + clip + adamw)}


def bench_step(args) -> None:
    import layouts  # bench/layouts.py (this script's directory is on sys.path)

    from mgs_kernels import _native

    class Flat(torch.nn.Module):
        def __init__(self, shapes):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.ps = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.02) for shape in shapes])

    lay = layouts.scaled("llama3.1-8b", args.numel)
    model = Flat([t.shape for t in lay.tensors])
    N = lay.numel
    bw = copy_bandwidth(1 << 28, args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu isa {_native.cpu().isa()}")
    print(f"layout: Llama-3.1-8B per tensor, scale {lay.scale:.4f}: {lay.num_tensors} tensors, N = {N:,} fp32 "
          f"elements; copy bandwidth {bw / 1e9:.2f} GB/s")
    print(f"{'T':>3} {'variant':<44} {'ms':>8} {'B/elem':>7} {'floor ms':>9} {'GB/s':>6} {'vs fused':>8}")
    params = list(model.parameters())
    for T in args.tasks:
        s = mgs_kernels.ModularGradientSurgery(model, num_tasks=T, partition="tensor", backend="cpu")
        s.buffer.normal_(generator=torch.Generator().manual_seed(T))
        s.task_grads.mark_touched()  # as if every parameter got a gradient from a captured backward
        opts = {
            "fused: surgery.step(AdamW, max_grad_norm=1)": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1),
            "resolve + clip + AdamW(foreach=False)": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1,
                                                                        foreach=False),
            "resolve + clip + AdamW(foreach=True)": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1,
                                                                       foreach=True),
        }

        def fused(opt=opts["fused: surgery.step(AdamW, max_grad_norm=1)"]):
            s.step(opt, max_grad_norm=1.0)

        def unfused(opt):
            s.resolve()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            for p in params:
                p.grad = None

        per_elem = step_bytes_per_elem(T)
        base = None
        for name, opt in opts.items():
            is_fused = name.startswith("fused")
            fn = fused if is_fused else (lambda opt=opt: unfused(opt))
            ms = median_ms(fn, args.repeats, warmup=2)  # the first step creates the optimizer state
            nbytes = per_elem["fused" if is_fused else "unfused"]
            floor = nbytes * N / bw * 1e3
            base = base or ms
            print(f"{T:>3} {name:<44} {ms:>8.1f} {nbytes:>7d} {floor:>9.1f} {nbytes * N / (ms / 1e3) / 1e9:>6.2f} "
                  f"{ms / base:>7.2f}x")
        s.remove()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, nargs="+", default=[20])
    ap.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--step", action="store_true", help="benchmark the fused optimizer step instead")
    ap.add_argument("--numel", type=float, default=1e7, help="--step: parameter elements of the flat model")
    args = ap.parse_args()
    if args.step:
        bench_step(args)
        return
    dtype = getattr(torch, args.dtype)
    esize = torch.tensor([], dtype=dtype).element_size()

    from mgs_kernels import _native

    bw = copy_bandwidth(1 << 28, args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu isa {_native.cpu().isa()}, "
          f"cache budget {_native.cpu().default_cache_bytes(torch.get_num_threads()) / 2**20:.1f} MiB default, "
          f"MGS_CPU_CACHE_BYTES={os.environ.get('MGS_CPU_CACHE_BYTES', '(unset)')}")
    print(f"copy bandwidth (256 MiB copy_, read + write): {bw / 1e9:.2f} GB/s")
    for scale in args.scale:
        bench_scale(args, scale, dtype, esize, bw)


def bench_scale(args, scale, dtype, esize, bw):
    sizes = llama_sizes(scale)
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(sizes), 0, out=offsets[1:])
    N = int(offsets[-1])
    print(f"layout: Llama-3.1-8B per tensor / {scale}: M = {len(sizes)} tensors, N = {N:,} elements, {args.dtype}")
    print(f"{'T':>3} {'floor ms':>9} {'2pass ms':>9} {'cpu ms':>8} {'% floor':>8} {'torch ms':>9} {'ref ms':>9} "
          f"{'cpu/floor':>9} {'vs 2pass':>8} {'vs torch':>9} {'vs ref':>8}")
    env = os.environ.get("MGS_CPU_CACHE_BYTES")
    for T in args.tasks:
        g = torch.Generator().manual_seed(T)
        grads = torch.randn(T, N, generator=g).to(dtype)
        order = mgs_kernels.random_order(len(sizes), T, generator=torch.Generator().manual_seed(0))
        out = torch.empty(N, dtype=dtype)
        floor_ms = (2 * T * N * esize + N * esize) / bw * 1e3
        run = lambda: mgs_kernels.modular_pcgrad(grads, offsets, order=order, out=out, backend="cpu")  # noqa: E731
        try:
            os.environ["MGS_CPU_CACHE_BYTES"] = "0"
            two_ms = median_ms(run, args.repeats)
        finally:
            if env is None:
                os.environ.pop("MGS_CPU_CACHE_BYTES")
            else:
                os.environ["MGS_CPU_CACHE_BYTES"] = env
        cpu_ms = median_ms(run, args.repeats)
        torch_ms = median_ms(
            lambda: mgs_kernels.modular_pcgrad(grads, offsets, order=order, out=out, backend="torch"),
            max(1, args.repeats // 2))
        ref_ms = median_ms(lambda: reference.modular_pcgrad(grads, offsets, order=order), args.ref_repeats, warmup=0)
        print(f"{T:>3} {floor_ms:>9.1f} {two_ms:>9.1f} {cpu_ms:>8.1f} {100 * floor_ms / cpu_ms:>7.0f}% {torch_ms:>9.1f} "
              f"{ref_ms:>9.1f} {cpu_ms / floor_ms:>8.2f}x {two_ms / cpu_ms:>7.2f}x {torch_ms / cpu_ms:>8.1f}x "
              f"{ref_ms / cpu_ms:>7.1f}x")
        grads = out = None  # free this case's buffers before the next one is allocated


if __name__ == "__main__":
    main()
