#!/usr/bin/env python
"""Cost of the Gram -> weights stage for every weighting method, against torchjd.

    python bench/weighting.py                       # T = 3 and 8, N ~ 4e6, every method (a few minutes)
    python bench/weighting.py --t 3 --methods upgrad,mgda --md table.md --json rows.json

Per method and T, on the per-tensor layout of Llama-3.1-8B (291 modules; bench/layouts.py, scaled to N
elements) with float32 task gradients on the CPU:

- weights ms: ``get_weighting(method)(gram)`` on the [291, T, T] Grams of ``segmented_gram`` (all modules,
  one call, float32 out), as a CPU user gets it: the native CPU solver where the method has one
  (csrc/cpu/mgs_weighting.h), else the batched torch code;
- torch code ms: the same call with the native solvers switched off: the batched torch code a GPU runs
  (here on the CPU, where its ~1000 small ops cost 5-10 us each; equal to weights ms for the methods
  without a native solver);
- Gram ms / combine ms: ``mgs_kernels.segmented_gram`` / ``segmented_combine`` on the [T, N] buffer;
- total ms: Gram + weights + combine, the whole modular step;
- torchjd per module: torchjd 0.18's ``XxxWeighting`` called once per module on the same Grams (its
  aggregator on the module's [T, n_m] slice for ConFIG and Nash-MTL, which have no Gram interface);
  where that takes longer than ``--budget`` seconds, it is timed on the first modules and scaled to
  291 (marked ~);
- torchjd global: torchjd's aggregator once on the full [T, N] matrix (not modular: one problem for the
  whole model; its Gram, solve and combine).

The task gradients share directions with mixed signs (g_k = sum_j A_kj z_j, A Gaussian [T, T], z i.i.d.
normal), so the per-module problems have conflicts, as real ones do. Times are medians of repeated calls
after a warm-up; a shared 2-core machine makes them noisy (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layouts  # noqa: E402

import mgs_kernels  # noqa: E402
import mgs_kernels.weighting._native_solvers as native_solvers  # noqa: E402
from mgs_kernels.weighting import get_weighting  # noqa: E402

METHODS = ["sum", "mean", "constant", "random", "upgrad", "dualproj", "mgda", "mgda_exact", "cagrad", "imtl_g",
           "aligned_mtl", "config", "fairgrad", "nash_mtl", "gradvac", "krum"]


def our_weighting(key: str, T: int):
    opts = {"constant": dict(weights=[1.0 / T] * T), "cagrad": dict(c=0.5), "fairgrad": dict(alpha=1.0),
            "krum": dict(n_byzantine=max(0, min(1, T - 3))), "mgda_exact": dict(solver="exact")}.get(key)
    return get_weighting("mgda" if key == "mgda_exact" else key, opts)


def torchjd_objects(key: str, T: int):
    """(per-module factory returning a callable on (gram_m, slice_m), global aggregator) or None."""
    import torchjd.aggregation as A

    f = max(0, min(1, T - 3))
    table = {
        "sum": (A.SumWeighting, A.Sum), "mean": (A.MeanWeighting, A.Mean),
        "constant": (lambda: A.ConstantWeighting(torch.full((T,), 1.0 / T)), lambda: A.Constant(torch.full((T,), 1.0 / T))),
        "random": (A.RandomWeighting, A.Random), "upgrad": (A.UPGradWeighting, A.UPGrad),
        "dualproj": (A.DualProjWeighting, A.DualProj), "mgda": (A.MGDAWeighting, A.MGDA),
        "cagrad": (lambda: A.CAGradWeighting(c=0.5), lambda: A.CAGrad(c=0.5)),
        "imtl_g": (A.IMTLGWeighting, A.IMTLG), "aligned_mtl": (A.AlignedMTLWeighting, A.AlignedMTL),
        "fairgrad": (lambda: A.FairGradWeighting(alpha=1.0), lambda: A.FairGrad(alpha=1.0)),
        "gradvac": (A.GradVacWeighting, A.GradVac),
        "krum": (lambda: A.KrumWeighting(n_byzantine=f), lambda: A.Krum(n_byzantine=f)),
    }
    if key in table:
        make_w, make_agg = table[key]
        return (lambda: (lambda g, s, w=make_w(): w(g))), make_agg  # noqa: B008 - one instance per closure
    if key == "config":
        return (lambda: (lambda g, s: A.ConFIG()(s))), A.ConFIG
    if key == "nash_mtl":
        return (lambda: (lambda g, s, a=A.NashMTL(n_tasks=T): a(s))), (lambda: A.NashMTL(n_tasks=T))  # noqa: B008
    return None


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms (GPU work included: synchronised before and after each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_grads(T: int, N: int, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(T, T, generator=gen)
    Z = torch.randn(T, N, generator=gen)
    return (A @ Z).contiguous().to(device)


def bench(args) -> List[Dict]:
    lay = layouts.scaled("llama3.1-8b", args.n)
    offsets = lay.offsets("tensor").to(args.device)
    M = offsets.numel() - 1
    rows = []
    for T in args.t:
        grads = make_grads(T, lay.numel, args.seed, args.device)
        gram = mgs_kernels.segmented_gram(grads, offsets)
        gram_ms = median_ms(lambda: mgs_kernels.segmented_gram(grads, offsets), args.reps)
        w0 = torch.full((M, T), 1.0 / T, device=args.device)
        combine_ms = median_ms(lambda: mgs_kernels.segmented_combine(grads, offsets, w0), args.reps)
        pc_ms = median_ms(lambda: mgs_kernels.pcgrad_weights(gram, order="fixed"), args.reps)
        rows.append(dict(method="pcgrad (existing kernel)", T=T, M=M, N=lay.numel, weights_ms=pc_ms,
                         torch_code_ms=None, gram_ms=gram_ms,
                         combine_ms=combine_ms, total_ms=gram_ms + pc_ms + combine_ms, torchjd_module_ms=None,
                         torchjd_module_extrapolated=False, torchjd_global_ms=None, converged=None))
        bounds = offsets.tolist()
        g_cpu = grads.cpu()
        for key in args.methods:
            w = our_weighting(key, T)
            state = w.init_state(M, T, gram.device) if w.stateful else None
            gen = torch.Generator().manual_seed(0)
            info: Dict[str, torch.Tensor] = {}
            w(gram, state=state, generator=gen, info=info)
            conv = info.get("converged")
            weights_ms = median_ms(lambda: w(gram, state=state, generator=gen), args.reps)
            native_solvers.NATIVE_SOLVERS = False
            try:
                torch_ms = median_ms(lambda: w(gram, state=state, generator=gen), args.reps)
            finally:
                native_solvers.NATIVE_SOLVERS = True
            row = dict(method=key, T=T, M=M, N=lay.numel, weights_ms=weights_ms, torch_code_ms=torch_ms,
                       gram_ms=gram_ms, combine_ms=combine_ms,
                       total_ms=gram_ms + weights_ms + combine_ms, torchjd_module_ms=None,
                       torchjd_module_extrapolated=False, torchjd_global_ms=None,
                       converged=None if conv is None else f"{int(conv.sum())}/{M}")
            objs = None if args.no_torchjd else torchjd_objects(key, T)
            if objs is not None:
                make_module_fn, make_global = objs
                g64 = gram.double().cpu()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fns = [make_module_fn() for _ in range(M)]  # stateful ones: one instance per module
                    done, t0 = 0, time.perf_counter()
                    for m in range(M):
                        fns[m](g64[m], g_cpu[:, bounds[m]:bounds[m + 1]].double())
                        done += 1
                        if time.perf_counter() - t0 > args.budget:
                            break
                    elapsed = (time.perf_counter() - t0) * 1e3
                    row["torchjd_module_ms"] = elapsed * M / done
                    row["torchjd_module_extrapolated"] = done < M
                    agg = make_global()
                    try:
                        row["torchjd_global_ms"] = median_ms(lambda: agg(g_cpu), max(1, args.reps // 3))
                    except Exception as exc:  # noqa: BLE001
                        print(f"torchjd global {key} T={T}: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append(row)
            if args.verbose:
                print(f"T={T} {key}: {weights_ms:.2f} ms", file=sys.stderr, flush=True)
    return rows


def fmt(x: Optional[float], approx: bool = False) -> str:
    if x is None:
        return "n/a"
    s = f"{x:.1f}" if x >= 10 else f"{x:.2f}"
    return ("~" if approx else "") + s


def markdown(rows: List[Dict]) -> str:
    head = ("| method | T | weights ms | torch code ms | Gram ms | combine ms | total ms | weights / Gram | "
            "torchjd per module ms | "
            "speed-up (weights) | torchjd global ms | converged |")
    out = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        tj = r["torchjd_module_ms"]
        out.append("| " + " | ".join([
            r["method"], str(r["T"]), fmt(r["weights_ms"]), fmt(r["torch_code_ms"]), fmt(r["gram_ms"]),
            fmt(r["combine_ms"]), fmt(r["total_ms"]),
            f"{r['weights_ms'] / r['gram_ms']:.0%}", fmt(tj, r["torchjd_module_extrapolated"]),
            "n/a" if tj is None else f"{tj / r['weights_ms']:.0f}x", fmt(r["torchjd_global_ms"]),
            r["converged"] or "",
        ]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=float, default=4e6, help="elements of the scaled Llama-3.1-8B layout (default 4e6, "
                   "the N of bench/run.py --quick)")
    p.add_argument("--t", type=lambda s: [int(x) for x in s.split(",")], default=[3, 8])
    p.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--budget", type=float, default=5.0, help="seconds for torchjd's per-module loop before "
                   "extrapolating")
    p.add_argument("--no-torchjd", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help="where the gradients, Grams and weights live (e.g. cuda; "
                   "torchjd always runs on the CPU, as it does for its users' solvers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {METHODS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    where = (f"CPU, {torch.get_num_threads()} threads" if args.device == "cpu"
             else f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})")
    header = (f"{where}, torch {torch.__version__}, Llama-3.1-8B per-tensor layout "
              f"(291 modules) scaled to N ~ {args.n:.3g}, float32 gradients; load average at start {load}")
    rows = bench(args)
    table = markdown(rows)
    print(header)
    print()
    print(table)
    cmd = "python bench/weighting.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"{header}\n\nCommand: `{cmd}`\n\n{table}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "command": cmd, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
