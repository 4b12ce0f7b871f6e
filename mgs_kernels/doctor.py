"""``python -m mgs_kernels.doctor``: what this machine has, which backends can run, and whether they are right.

Prints versions (Python, torch, CUDA runtime / driver, Triton, nvcc / ptxas), devices, every backend's status
on each device with the reason when it cannot run, a parity check of every usable backend against the float64
reference (``mgs_kernels._selfcheck.parity_check``: several task counts, dtypes and layouts, the fused
optimizer step), and a short timing table of ``modular_pcgrad`` with its percentage of a copy-bandwidth floor.
Exit status 1 when a usable backend fails its parity check (0 otherwise). Run it first on a new GPU machine.

Options: ``--device DEV`` (repeatable; default: cpu and the current CUDA device), ``--quick`` (the small
parity check only), ``--no-timing``, ``--json PATH`` (everything as JSON).

On a CPU-only machine the cpu and torch backends are checked; with ``TRITON_INTERPRET=1`` also the Triton
kernels in Triton's interpreter (slow: a reduced parity set, no timing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch


def _run(cmd: List[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> Dict[str, str]:
    """Versions of everything the kernels depend on ("-" where absent)."""
    import mgs_kernels
    from mgs_kernels import _native

    v = {
        "python": platform.python_version(),
        "mgs_kernels": mgs_kernels.__version__,
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda or "-"),
    }
    try:
        import triton

        v["triton"] = triton.__version__
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            ptxas = get_ptxas(90)
            v["triton ptxas"] = f"{ptxas.version} ({ptxas.path})"
        except Exception as exc:  # noqa: BLE001
            v["triton ptxas"] = f"- ({type(exc).__name__})"
    except ImportError:
        v["triton"] = "-"
    try:
        v["native CUDA module"] = _native.cuda_module().runtime_info()
    except ImportError:
        v["native CUDA module"] = "not built"
    try:
        v["native CPU module"] = f"isa {_native.cpu().isa()}, OpenMP {bool(_native.cpu().OPENMP)}"
    except ImportError:
        v["native CPU module"] = "not built"
    nvcc = os.environ.get("MGS_NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    out = _run([nvcc, "--version"]) if os.path.exists(nvcc) else None
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out or "")
    v["nvcc"] = f"{m.group(1)} {m.group(2)} ({nvcc})" if m else "-"
    if torch.cuda.is_available():
        try:
            drv = torch._C._cuda_getDriverVersion()  # e.g. 12080
            v["CUDA driver"] = f"{drv // 1000}.{(drv % 1000) // 10}"
        except Exception:  # noqa: BLE001
            pass
    v["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    return v


def devices() -> List[Dict[str, object]]:
    out: List[Dict[str, object]] = [{"device": "cpu", "name": platform.processor() or platform.machine(),
                                     "threads": torch.get_num_threads()}]  # fmt: skip
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({
                "device": f"cuda:{i}", "name": p.name, "capability": f"sm_{p.major}{p.minor}",
                "memory_GiB": round(p.total_memory / 2**30, 1), "SMs": p.multi_processor_count,
                "smem_optin_B": int(getattr(p, "shared_memory_per_block_optin", 0) or 0),
            })  # fmt: skip
    return out


def backend_table(devs: List[torch.device]) -> Dict[str, Dict[str, Optional[str]]]:
    """device -> backend -> None (usable) or why not; plus the CUDA module's own probe per CUDA device."""
    from mgs_kernels import _native, backends

    table = {}
    for d in devs:
        status = dict(backends.backend_status(d))
        if d.type == "cuda" and status.get("cuda") is None:
            probe = _native.cuda_probe(d)  # runs a tiny kernel: catches a missing kernel image / driver
            if probe is not None:
                status["cuda"] = f"probe kernel failed: {probe}"
        table[str(d)] = status
    return table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def timing(backend_names: List[str], device: torch.device) -> List[Dict[str, object]]:
    """modular_pcgrad on one layout per (T, dtype): best time, effective bandwidth and % of the floor.

    The floor is the time to move the bytes a two-pass schedule must move (read the T rows twice, write
    one row) at the bandwidth of ``copy_`` of the same buffer measured here.
    """
    import mgs_kernels as mgs

    cuda = device.type == "cuda"
    N = (1 << 26) if cuda else (1 << 20)
    reps = 10 if cuda else 3
    sizes = [N // 2, N // 4 + 3, N // 8, N - (N // 2 + N // 4 + 3 + N // 8)]
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    off = offsets.to(device)
    rows = []
    for T, dtype in ((2, torch.bfloat16), (4, torch.bfloat16), (8, torch.bfloat16), (16, torch.bfloat16),
                     (4, torch.float32)):  # fmt: skip
        g = torch.randn(T, N, device=device).to(dtype)
        out = torch.empty(N, dtype=dtype, device=device)
        order = mgs.fixed_order(len(sizes), T, device=device)
        src = g.view(-1)
        dst = torch.empty_like(src)
        t_copy = _time(lambda: dst.copy_(src), device, reps)
        bw = 2 * src.numel() * src.element_size() / t_copy  # bytes read + written per second
        floor = (2 * T + 1) * N * g.element_size() / bw
        for name in backend_names:
            try:
                t = _time(lambda: mgs.modular_pcgrad(g, off, order=order, out=out, backend=name), device, reps)
            except Exception as exc:  # noqa: BLE001
                rows.append({"backend": name, "T": T, "dtype": str(dtype)[6:], "error": f"{type(exc).__name__}: {exc}"})
                continue
            rows.append({"backend": name, "T": T, "dtype": str(dtype)[6:], "N": N, "ms": round(t * 1e3, 3),
                         "GB/s": round((2 * T + 1) * N * g.element_size() / t / 1e9, 1),
                         "copy GB/s": round(bw / 1e9, 1), "% of floor": round(100 * floor / t, 1)})  # fmt: skip
        g = out = src = dst = None  # free this case's buffers before the next one is allocated
    return rows


def _print_table(rows: List[Dict[str, object]]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    widths = [max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  " + "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  " + "  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgs_kernels.doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--device", action="append", help="device to check (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the small parity check only")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    parser.add_argument("--json", help="also write everything to this JSON file")
    args = parser.parse_args(argv)

    from mgs_kernels import _selfcheck

    report: Dict[str, object] = {}
    print("mgs_kernels doctor\n\nversions")
    report["versions"] = versions()
    for k, v in report["versions"].items():
        print(f"  {k:20s} {v}")
    print("\ndevices")
    report["devices"] = devices()
    for d in report["devices"]:
        print("  " + ", ".join(f"{k}={v}" for k, v in d.items()))

    if args.device:
        devs = [torch.device(d) for d in args.device]
    else:
        devs = [torch.device("cpu")]
        if torch.cuda.is_available():
            devs.append(torch.device("cuda", torch.cuda.current_device()))
    print("\nbackends (None = usable)")
    table = backend_table(devs)
    report["backends"] = table
    for d, status in table.items():
        for name, why in status.items():
            print(f"  {d:8s} {name:7s} {'usable' if why is None else why}")

    print("\nparity vs the float64 reference" + (" (quick)" if args.quick else ""))
    failures = []
    parity: Dict[str, Dict[str, Optional[str]]] = {}
    for d, status in table.items():
        parity[d] = {}
        for name, why in status.items():
            if why is not None:
                continue
            t0 = time.time()
            err = _selfcheck.parity_check(name, torch.device(d), quick=args.quick)
            parity[d][name] = err
            print(f"  {d:8s} {name:7s} {'PASS' if err is None else 'FAIL: ' + err} ({time.time() - t0:.1f} s)")
            if err is not None:
                failures.append((d, name, err))
    report["parity"] = parity

    if not args.no_timing:
        report["timing"] = {}
        for d, status in table.items():
            dev = torch.device(d)
            names = [n for n, why in status.items() if why is None and parity[d].get(n) is None
                     and not (dev.type == "cpu" and n == "triton")]  # fmt: skip
            if not names:
                continue
            print(f"\ntiming on {d}: modular_pcgrad, best of several runs (floor: 2T+1 rows at copy_ bandwidth)")
            rows = timing(names, dev)
            report["timing"][d] = rows
            _print_table(rows)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if failures:
        print(f"\n{len(failures)} usable backend(s) FAILED parity:")
        for d, name, err in failures:
            print(f"  {d} {name}: {err}")
        return 1
    print("\nall usable backends pass parity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
