#!/usr/bin/env python
"""Benchmark of Modular Gradient Surgery: every provider on real-model gradient layouts.

    python bench/run.py --quick                      # < 3 min on a 2-core CPU, prints a markdown table
    python bench/run.py                              # the whole grid, sized for the device
    python bench/run.py --quick --json rows.json --md table.md --plot plot.png

Each row times one provider (see providers.py) on one case: a model layout (layouts.py) scaled to N
elements, a partition ("tensor" / "module" / "global"), T tasks and a storage dtype. Columns:

- median_ms, p20_ms, p80_ms: CPU: wall time of repeated calls after warm-up, the last-level cache
  flushed (a buffer of 1.25 x its size written) before each call (``--hot-cache`` to skip); GPU:
  ``triton.testing.do_bench`` (device events, L2 flushed) or, without Triton or for slow calls,
  CUDA events around each call with the L2 flushed in between.
- gbps: floor bytes / median time, where floor bytes = 2*T*N*bytes read + N*bytes written
  (the two passes over the [T, N] buffer and the output, docs/design.md section 1).
- pct_floor: floor time / median time, floor time = floor bytes at the copy bandwidth measured in
  this run (``dst.copy_(src)``, read + write bytes counted, measured at start and before every case;
  the best sample is used). 100% = as fast as a copy of that traffic. It can exceed 100%: a copy also
  pays the write-allocate read of its destination, and small buffers stay partly in a large cache.
- speedup_vs_loop: reference_loop median / this median, same case (same data, order, layout).
- peak_mb: peak extra memory of one call (output included): ``torch.cuda.max_memory_allocated`` on
  GPU; on CPU the peak of the torch CPU allocator's live bytes during the call, from the profiler's
  allocation events ("n/a" where profiling the call would take too long).
- max_rel_err: max|out - ref| / max|ref| against a float64 Gram-space reference (``reference.gram``
  in float64, the PCGrad solve in float64, float64 combine), on the provider's first call. A row
  over tolerance is marked FAIL and posts no speed numbers (the run then exits with status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import IO, Callable, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import layouts  # noqa: E402
import providers as providers_mod  # noqa: E402
import mgs_kernels  # noqa: E402
from mgs_kernels import reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 5e-3}
ALL_T = (2, 3, 4, 8, 16, 32, 64)


# ----------------------------------------------------------------------------------------------- env
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "n/a"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _cpu_flush_bytes() -> int:
    """1.25 x the largest CPU cache sysfs reports (at least 32 MiB, at most 1 GiB)."""
    size = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            size = max(size, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return int(min(max(1.25 * size, 32 << 20), 1 << 30))


# -------------------------------------------------------------------------------------------- timing
def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    method: str


class Timer:
    """Times a zero-argument callable on the CPU (wall clock) or on a GPU (device events)."""

    def __init__(self, device: torch.device, budget_s: float, min_reps: int, max_reps: int, flush: bool = True):
        self.device = device
        self.budget_s = budget_s
        self.min_reps = min_reps
        self.max_reps = max_reps
        self._flush: Optional[torch.Tensor] = None
        if flush:
            # Written before every timed call so each call starts with cold caches (as do_bench does
            # on a GPU): 256 MB is above any GPU's L2; on the CPU, 1.25 x the last-level cache.
            nbytes = (256 << 20) if device.type == "cuda" else _cpu_flush_bytes()
            self._flush = torch.empty(nbytes, dtype=torch.int8, device=device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], object]) -> Tuple[object, float]:
        """(result, milliseconds) of one call, synchronised."""
        if self._flush is not None:
            self._flush.zero_()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3

    def measure(self, fn: Callable[[], object], first_ms: float, slow: bool) -> Timing:
        """Time ``fn`` (already called once, taking ``first_ms``). ``slow``: a host-synchronising
        loop, measured with fewer repeats; when one call takes more than ten budgets, that call is
        the measurement (reps = 1)."""
        budget_ms = self.budget_s * 1e3
        if slow and first_ms >= 10 * budget_ms:
            return Timing(first_ms, first_ms, first_ms, 1, "single")
        _, est = self.once(fn)  # warm-up (plans, caches, allocator) and a better estimate
        if self.device.type == "cuda" and est < 20.0 and not slow:
            try:
                import triton.testing

                samples = triton.testing.do_bench(fn, warmup=25, rep=max(50, int(budget_ms)), return_mode="all")
                return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8),
                              len(samples), "do_bench")
            except Exception as exc:  # noqa: BLE001 - no Triton, or no Triton driver: plain CUDA events
                if not getattr(Timer, "_warned", False):
                    print(f"do_bench unavailable ({type(exc).__name__}: {exc}); timing with CUDA events",
                          file=sys.stderr)
                    Timer._warned = True
        min_reps = 3 if (slow or est > 1e3) else self.min_reps
        reps = int(max(min_reps, min(self.max_reps, budget_ms / max(est, 1e-3))))
        samples = [self.once(fn)[1] for _ in range(reps)]
        method = "cuda_events" if self.device.type == "cuda" else "wall"
        return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), reps, method)


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write counted) on a buffer far above cache size."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    _, first = timer.once(fn)
    copy_timer = Timer(device, budget_s=max(timer.budget_s, 0.5), min_reps=10, max_reps=20, flush=False)
    copy_timer._flush = timer._flush  # same cache state as the benchmarks, one flush buffer
    t = copy_timer.measure(fn, first, slow=False)
    return 2 * nbytes / (t.median_ms * 1e-3)


# -------------------------------------------------------------------------------------------- memory
# libkineto announces every profiler start and stop on stderr from native code ("USDT:<time> <pid>:<tid>
# SyncActivityProfilerHandler.cpp:52] profiler_start"): 2 lines per measured call, none of them news.
_PROFILER_NOISE = re.compile(r"^USDT:.*\] profiler_(start|stop)\s*$")


@contextlib.contextmanager
def _drop_native_lines(noise: "re.Pattern[str]"):
    """Run the body with file descriptors 1 and 2 pointed at temporary files, then write back every
    captured line that does not match ``noise``. Native code writes straight to the descriptors, so
    swapping ``sys.stdout`` / ``sys.stderr`` would not catch it. Where the descriptors cannot be
    duplicated (closed, or no such thing), the body runs unfiltered."""
    saved: Dict[int, int] = {}
    captured: Dict[int, IO[bytes]] = {}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            tmp = tempfile.TemporaryFile()
            saved[fd] = os.dup(fd)
            captured[fd] = tmp
            os.dup2(tmp.fileno(), fd)
    except (OSError, ValueError, AttributeError):
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)
        for tmp in captured.values():
            tmp.close()
        saved, captured = {}, {}
    try:
        yield
    finally:
        if saved:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, dup in saved.items():
                os.dup2(dup, fd)
                os.close(dup)
            for fd, tmp in captured.items():
                tmp.seek(0)
                kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                        if not noise.match(line)]
                tmp.close()
                if kept:  # anything else (a warning, an error) still reaches the person, on its stream
                    os.write(fd, "".join(kept).encode())


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by one call beyond what was live before it (its output included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with _drop_native_lines(_PROFILER_NOISE):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = fn()
            del out
        allocs = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            ev = stack.pop()
            if ev.tag == _EventType.Allocation:
                allocs.append((ev.start_time_ns, ev.extra_fields.alloc_size))
            stack.extend(ev.children)
    except Exception:  # noqa: BLE001 - profiler internals differ across torch versions
        return None
    allocs.sort()
    live = peak = 0
    for _, size in allocs:
        live += size
        peak = max(peak, live)
    return int(peak)


# ------------------------------------------------------------------------------------------ progress
class _NoBar:
    """Stands in for a tqdm bar where there is none (``--quiet``, stderr not a terminal, no tqdm)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(s: str, file=None) -> None:
        print(s, file=file or sys.stdout, flush=True)


def progress_bar(total: int, quiet: bool):
    """One bar on stderr for the whole run, counting timed calls, so its ETA covers everything still
    to come. A silent stand-in with ``--quiet``, when stderr is not a terminal (logs, CI, pipes) or
    when tqdm is not installed. Lines printed while it runs go through its ``write``."""
    if quiet or not sys.stderr.isatty():
        return _NoBar(total)
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(total)
    # miniters=1 keeps tqdm's monitor thread from drawing: the bar is drawn by update() only, never while
    # the peak-memory measurement has the file descriptors redirected. smoothing=0: the ETA uses the mean
    # rate of the whole run so far (timings differ by 100x between providers; a moving average jumps).
    return tqdm(total=total, desc="bench", unit="timing", leave=False, miniters=1, mininterval=0, smoothing=0,
                dynamic_ncols=True, file=sys.stderr)


def _shrink(bar, n: int) -> None:
    """Take ``n`` timings that will not run (loops past the deadline, a skipped stage) off the bar."""
    if n:
        bar.total -= n
        bar.refresh()


# ------------------------------------------------------------------------------------ float64 check
def reference64(grads: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """float64 [N]: modular PCGrad from float64 Gram matrices (the package's one PCGrad solve, in float64)."""
    gram = reference.gram(grads, offsets, torch.float64)
    weights = reference.pcgrad_weights(gram, order.to(grads.device))
    bounds = offsets.tolist()
    out = torch.empty(grads.shape[1], dtype=torch.float64, device=grads.device)
    for m in range(len(bounds) - 1):
        a, b = bounds[m], bounds[m + 1]
        if b > a:
            out[a:b] = weights[m] @ grads[:, a:b].double()
    return out


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    if not math.isfinite(err):
        return float("inf")
    return err / scale if scale > 0 else err


# --------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    model: str
    n_target: float
    T: int
    dtype: str
    partitions: Tuple[str, ...]
    loops: bool  # run the Python-loop providers (reference_loop, pcgrad_global_loop) here


def quick_cases() -> List[Case]:
    n = 4e6
    L, Q = "llama3.1-8b", "qwen2.5-7b"
    return [
        Case(L, n, 2, "fp32", ("tensor",), True),
        Case(L, n, 3, "fp32", ("tensor", "module", "global"), True),
        Case(L, n, 8, "fp32", ("tensor",), True),
        Case(L, n, 16, "fp32", ("tensor",), False),
        Case(L, n, 3, "bf16", ("tensor",), True),
        Case(Q, n, 3, "fp32", ("tensor",), True),
        Case(L, 1e6, 3, "fp32", ("tensor",), True),
        Case(L, 16e6, 3, "fp32", ("tensor",), False),
    ]


def _nice_floor(x: float) -> float:
    """Largest 1/2/4/8 x 10^k not above x."""
    k = 10 ** math.floor(math.log10(x))
    for m in (8, 4, 2, 1):
        if m * k <= x:
            return float(m * k)
    return float(k)


def full_cases(args, device: torch.device) -> List[Case]:
    # Sized for the device: the main sweep keeps a [64, N] fp32 buffer plus the providers' copies
    # (about 3 buffers) within half of the free memory; the N sweep at T=3 goes up to the real model.
    budget = 0.5 * _available_bytes(device)
    t_list = args.t or list(ALL_T)
    n_main = args.n or min(_nice_floor(budget / (3 * max(t_list) * 4)), 8e9)
    n_max = min(budget / (3 * 3 * 4), 8.03e9)
    cases = []
    for model in args.models:
        for dtype in args.dtypes:
            for T in t_list:
                cases.append(Case(model, n_main, T, dtype, tuple(args.partitions), T <= args.loop_max_t))
    if args.n_sweep == "none":
        return cases
    if args.n_sweep == "auto":
        sweep = []
        n = 1e6
        while n <= n_max:
            sweep.append(n)
            n *= 4
    else:
        sweep = [float(x) for x in args.n_sweep.split(",")]
    for n in sweep:
        if abs(n - n_main) > 1 or 3 not in t_list or "fp32" not in args.dtypes or "tensor" not in args.partitions:
            cases.append(Case(args.models[0], n, 3, "fp32", ("tensor",), n <= args.loop_max_n))
    return cases


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    provider: str
    model: str
    partition: str
    M: int
    T: int
    N: int
    dtype: str
    device: str
    median_ms: Optional[float]
    p20_ms: Optional[float]
    p80_ms: Optional[float]
    gbps: Optional[float]
    pct_floor: Optional[float]
    floor_ms: float
    speedup_vs_loop: Optional[float]
    peak_mb: Optional[float]
    max_rel_err: float
    check: str
    reps: int
    timing: str
    torch: str
    triton: str
    scale: float
    num_tensors: int
    copy_gbps: float
    note: str = ""


def run_case(case: Case, provs: Dict[str, providers_mod.Provider], env: dict, timer: Timer, args,
             bar=None) -> List[Row]:
    bar = bar if bar is not None else _NoBar(0)
    device = env["device_obj"]
    lay = layouts.scaled(case.model, case.n_target)
    N, T, dtype = lay.numel, case.T, DTYPES[case.dtype]
    gen = torch.Generator(device="cpu").manual_seed(args.seed + T)
    # Independent Gaussian task gradients: about half of all task pairs conflict in every module.
    grads = torch.empty(T, N, dtype=dtype, device=device)
    data_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(args.seed + T)
    for t in range(T):
        grads[t].copy_(torch.randn(N, generator=data_gen, device=device))
    nbytes = grads.element_size()
    floor_bytes = (2 * T * N + N) * nbytes
    case_bw = copy_bandwidth(device, timer)  # the load on a shared machine drifts: sample it per case
    env["copy_samples"].append(case_bw)
    floor_ms = floor_bytes / env["copy_Bps"] * 1e3  # provisional; finalise_floor() uses the best sample
    rows: List[Row] = []
    for partition in case.partitions:
        offsets = lay.offsets(partition).to(device)
        M = offsets.numel() - 1
        order = mgs_kernels.random_order(M, T, generator=gen).to(device)
        refs: Dict[bool, torch.Tensor] = {}  # modular -> float64 reference output
        loop_ms: Optional[float] = None
        loops = case.loops and not (args.deadline and time.perf_counter() - args.t_start > args.deadline)
        names = [n for n in provs if loops or not provs[n].loop]
        names.sort(key=lambda n: n != providers_mod.REFERENCE)  # the reference first: speedups need it
        if case.loops and not loops:
            _shrink(bar, sum(p.loop for p in provs.values()))
        for name in names:
            prov = provs[name]
            bar.set_postfix_str(f"{case.model} {partition} T={T} N={N:.2g} {case.dtype}: {name}")
            fn = lambda: prov.fn(grads, offsets, order)  # noqa: E731
            note = ""
            out, first_ms = timer.once(fn)
            if prov.modular not in refs:
                if prov.modular:
                    refs[True] = reference64(grads, offsets, order)
                else:
                    refs[False] = reference64(grads, offsets[[0, -1]], order[:1])
                    note = "global PCGrad whatever the partition"
            err = max_rel_err(out, refs[prov.modular])
            del out
            ok = err <= TOLERANCE[case.dtype]
            t = timer.measure(fn, first_ms, slow=prov.loop)
            peak = None
            if args.mem and t.median_ms * 6 <= args.mem_max_s * 1e3:
                peak = peak_extra_bytes(fn, device)
            if name == providers_mod.REFERENCE and ok:
                loop_ms = t.median_ms
            rows.append(
                Row(
                    provider=name, model=case.model, partition=partition, M=M, T=T, N=N, dtype=case.dtype,
                    device=env["device"],
                    median_ms=t.median_ms if ok else None,
                    p20_ms=t.p20_ms if ok else None,
                    p80_ms=t.p80_ms if ok else None,
                    gbps=floor_bytes / (t.median_ms * 1e-3) / 1e9 if ok else None,
                    pct_floor=100.0 * floor_ms / t.median_ms if ok else None,
                    floor_ms=floor_ms,
                    speedup_vs_loop=(loop_ms / t.median_ms) if (ok and loop_ms is not None) else None,
                    peak_mb=peak / 1e6 if peak is not None else None,
                    max_rel_err=err, check="ok" if ok else "FAIL", reps=t.reps, timing=t.method,
                    torch=env["torch"], triton=env["triton"], scale=lay.scale, num_tensors=lay.num_tensors,
                    copy_gbps=case_bw / 1e9, note=note,
                )
            )
            bar.update()
            if args.verbose:
                bar.write(f"  {name:20s} {case.model} {partition:7s} T={T:<3d} N={N:.3g} {case.dtype} "
                          f"{t.median_ms:10.2f} ms  err={err:.1e}", file=sys.stderr)
    return rows


def finalise_floor(rows: List[Row], env: dict) -> None:
    """Floor time of every row at the best copy bandwidth measured in this run (start and before every
    case): the machine's achievable bandwidth, not whatever a neighbour's load left at that moment."""
    env["copy_Bps"] = max(env["copy_samples"])
    for r in rows:
        floor_bytes = (2 * r.T * r.N + r.N) * DTYPES[r.dtype].itemsize
        r.floor_ms = floor_bytes / env["copy_Bps"] * 1e3
        if r.median_ms is not None:
            r.pct_floor = 100.0 * r.floor_ms / r.median_ms


# ----------------------------------------------------------------------------- surgery vs fwd + bwd
def surgery_cost_timings(provs: Dict[str, providers_mod.Provider]) -> int:
    """Timed calls of ``surgery_cost``: fwd+bwd before and after, every provider, resolve()."""
    return len(provs) + 3


def surgery_cost(provs: Dict[str, providers_mod.Provider], env: dict, timer: Timer, args,
                 bar=None) -> List[dict]:
    """modular_pcgrad at T=3 on a small Llama's per-tensor layout, as a fraction of one forward +
    backward of that model."""
    bar = bar if bar is not None else _NoBar(0)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as exc:  # noqa: BLE001
        _shrink(bar, surgery_cost_timings(provs))
        bar.write(f"surgery cost skipped: transformers not importable ({exc})", file=sys.stderr)
        return []
    device = env["device_obj"]
    if device.type == "cuda" and not args.quick:
        cfg = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4)
        batch, seq = 8, 512
    else:
        cfg = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2)
        batch, seq = (2, 128) if args.quick else (8, 256)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=seq, tie_word_embeddings=False, **cfg)).to(device)
    model.train()
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    bar.set_postfix_str("surgery cost: forward+backward")
    _, first = timer.once(fwd_bwd)
    fb_before = timer.measure(fwd_bwd, first, slow=True)
    bar.update()
    model.zero_grad(set_to_none=True)

    part = mgs_kernels.build_partition(model, "tensor")
    T = 3
    N, M = part.numel, part.num_modules
    gen = torch.Generator().manual_seed(args.seed)
    grads = torch.randn(T, N, generator=gen).to(device)
    offsets = part.offsets.to(device)
    order = mgs_kernels.random_order(M, T, generator=gen).to(device)
    model_desc = (f"Llama h={cfg['hidden_size']} L={cfg['num_hidden_layers']} V={cfg['vocab_size']} "
                  f"({N / 1e6:.1f}M params), batch {batch}x{seq}")
    timed = []
    ref = reference64(grads, offsets, order)
    for name, prov in provs.items():
        if prov.loop and args.deadline and time.perf_counter() - args.t_start > args.deadline:
            _shrink(bar, 1)
            continue
        bar.set_postfix_str(f"surgery cost: {name}")
        fn = lambda: prov.fn(grads, offsets, order)  # noqa: E731
        res, first = timer.once(fn)
        if prov.modular and max_rel_err(res, ref) > TOLERANCE["fp32"]:
            bar.update()
            bar.write(f"surgery cost: {name} FAILED the check", file=sys.stderr)
            continue
        timed.append((name, timer.measure(fn, first, slow=prov.loop)))
        bar.update()
    # The model-level API end to end: ModularGradientSurgery.resolve() after three captured tasks.
    bar.set_postfix_str("surgery cost: ModularGradientSurgery.resolve")
    try:
        s = mgs_kernels.ModularGradientSurgery(model, num_tasks=T, partition="tensor", backend="auto")
        for task in range(T):
            with s.capture(task):
                model(input_ids=torch.roll(ids, task, 1), labels=torch.roll(ids, task, 1)).loss.backward()
        _, first = timer.once(s.resolve)
        auto = s.backend_name
        timed.append((f"ModularGradientSurgery.resolve (auto: {auto})", timer.measure(s.resolve, first, slow=False)))
        s.remove()
    except Exception as exc:  # noqa: BLE001
        bar.write(f"surgery cost: ModularGradientSurgery.resolve skipped ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
    bar.update()
    # fwd+bwd again after the surgery timings; the lower median is used (a neighbour's load only slows).
    bar.set_postfix_str("surgery cost: forward+backward again")
    model.zero_grad(set_to_none=True)
    _, first = timer.once(fwd_bwd)
    fb_after = timer.measure(fwd_bwd, first, slow=True)
    bar.update()
    model.zero_grad(set_to_none=True)
    fb_ms = min(fb_before.median_ms, fb_after.median_ms)
    return [dict(provider=name, model=model_desc, T=T, N=N, M=M, surgery_ms=t.median_ms, fwd_bwd_ms=fb_ms,
                 fwd_bwd_before_ms=fb_before.median_ms, fwd_bwd_after_ms=fb_after.median_ms,
                 ratio=t.median_ms / fb_ms, device=env["device"], torch=env["torch"], triton=env["triton"])
            for name, t in timed]


# -------------------------------------------------------------------------------------------- output
COLUMNS = [
    ("provider", "provider", "{}"), ("model", "model", "{}"), ("partition", "partition", "{}"), ("M", "M", "{}"),
    ("T", "T", "{}"), ("N", "N", "{:.3g}"), ("dtype", "dtype", "{}"), ("median_ms", "median ms", "{:.2f}"),
    ("p20_ms", "p20 ms", "{:.2f}"), ("p80_ms", "p80 ms", "{:.2f}"), ("gbps", "GB/s", "{:.1f}"),
    ("pct_floor", "% floor", "{:.1f}"), ("speedup_vs_loop", "vs loop", "{:.2f}x"), ("peak_mb", "peak MB", "{:.1f}"),
    ("max_rel_err", "max rel err", "{:.1e}"), ("check", "check", "{}"), ("reps", "reps", "{}"),
    ("device", "device", "{}"), ("torch", "torch", "{}"), ("triton", "triton", "{}"),
]


def _fmt(value, spec: str) -> str:
    if value is None:
        return "n/a"
    return spec.format(value)


def markdown_table(rows: List[Row]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        d = asdict(r)
        lines.append("| " + " | ".join(_fmt(d[k], spec) for k, _, spec in COLUMNS) + " |")
    return "\n".join(lines)


def surgery_table(items: List[dict]) -> str:
    if not items:
        return ""
    lines = [
        f"Surgery cost vs one forward+backward of {items[0]['model']}, T={items[0]['T']}, "
        f"M={items[0]['M']} tensors, on {items[0]['device']} (fwd+bwd median {items[0]['fwd_bwd_before_ms']:.1f} ms "
        f"before and {items[0]['fwd_bwd_after_ms']:.1f} ms after the surgery timings; the lower is used):",
        "",
        "| provider | surgery ms | fwd+bwd ms | surgery / fwd+bwd | device | torch | triton |",
        "|---|---|---|---|---|---|---|",
    ]
    for it in items:
        lines.append(f"| {it['provider']} | {it['surgery_ms']:.2f} | {it['fwd_bwd_ms']:.1f} | {it['ratio']:.3f} | "
                     f"{it['device']} | {it['torch']} | {it['triton']} |")
    return "\n".join(lines)


def header(env: dict, args) -> str:
    """Three lines: what ran where, which providers (and why the other backends did not), how it was timed."""
    skipped = "".join(f"; mgs:{name} not run ({why})" for name, why in env["unusable"].items())
    return (
        f"mgs_kernels {mgs_kernels.__version__} benchmark ({'quick' if args.quick else 'full'}) on {env['device']}; "
        f"torch {env['torch']}, triton {env['triton']}, python {platform.python_version()}\n"
        f"providers: {', '.join(env['providers'])}{skipped}\n"
        f"copy bandwidth {env['copy_samples'][0] / 1e9:.1f} GB/s at start (read+write of a "
        f"{'1 GiB' if env['device_obj'].type == 'cuda' else '256 MiB'} dst.copy_(src), re-measured before "
        f"every case; the floor uses the best sample); caches {'flushed' if args.flush else 'NOT flushed'} "
        f"before each timed call; load average at start {env['load']}."
    )


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small grid that finishes in < 3 min on a 2-core CPU")
    p.add_argument("--json", metavar="PATH", help="write the rows (and the surgery-cost rows) as JSON")
    p.add_argument("--md", metavar="PATH", help="write the header and tables as markdown")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--providers", type=lambda s: s.split(","), help="comma list (default: all available)")
    p.add_argument("--models", type=lambda s: s.split(","), default=list(layouts.LAYOUTS))
    p.add_argument("--partitions", type=lambda s: s.split(","), default=list(layouts.PARTITIONS))
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    p.add_argument("--t", type=lambda s: [int(x) for x in s.split(",")], help=f"task counts (full default {ALL_T})")
    p.add_argument("--n", type=float, help="N of the main sweep (full default: sized to the device memory)")
    p.add_argument("--n-sweep", default="auto", help="N values of the time-vs-N sweep at T=3 (full): 'auto' "
                   "(1e6 x 4^k up to what fits, at most the real model), 'none', or a comma list")
    p.add_argument("--loop-max-t", type=int, default=16, help="run the Python-loop providers up to this T (full)")
    p.add_argument("--loop-max-n", type=float, default=64e6, help="... and up to this N in the N sweep (full)")
    p.add_argument("--budget", type=float, help="seconds of repeats per measurement (quick 0.3, full 2)")
    p.add_argument("--hot-cache", dest="flush", action="store_false",
                   help="do not flush the caches before each timed call (default: flush, like do_bench)")
    p.add_argument("--no-mem", dest="mem", action="store_false", help="skip the peak-memory measurement")
    p.add_argument("--mem-max-s", type=float, default=3.0, help="skip memory profiling of calls slower than s/6")
    p.add_argument("--no-surgery-cost", dest="surgery_cost", action="store_false")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--deadline", type=float, help="after this many seconds, skip the Python-loop providers "
                   "in the remaining cases (quick default 100, so --quick stays under 3 min on a loaded machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (it is off anyway when stderr "
                   "is not a terminal, or without tqdm)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per timing on stderr")
    args = p.parse_args(argv)
    for m in args.models:
        if m not in layouts.LAYOUTS:
            p.error(f"unknown model {m!r}; choose from {list(layouts.LAYOUTS)}")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {list(DTYPES)}")
    for part in args.partitions:
        if part not in layouts.PARTITIONS:
            p.error(f"unknown partition {part!r}; choose from {layouts.PARTITIONS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = args.t_start = time.perf_counter()
    if args.deadline is None and args.quick:
        args.deadline = 100.0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 2.0)
    timer = Timer(device, budget_s=budget, min_reps=5 if args.quick else 10, max_reps=10 if args.quick else 100,
                  flush=args.flush)
    provs = providers_mod.get_providers(device, args.providers)
    env = dict(device_obj=device, device=device_name(device), torch=torch.__version__, triton=triton_version(),
               providers=list(provs), unusable=providers_mod.unusable_backends(device), load=_loadavg())
    env["copy_Bps"] = copy_bandwidth(device, timer)
    env["copy_samples"] = [env["copy_Bps"]]
    print(header(env, args), flush=True)

    cases = quick_cases() if args.quick else full_cases(args, device)
    timings = sum(len(c.partitions) * sum(c.loops or not p.loop for p in provs.values()) for c in cases)
    bar = progress_bar(timings + (surgery_cost_timings(provs) if args.surgery_cost else 0), args.quiet)
    rows: List[Row] = []
    try:
        for i, case in enumerate(cases):
            if args.verbose:
                bar.write(f"[{i + 1}/{len(cases)}] {case} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
            rows.extend(run_case(case, provs, env, timer, args, bar))
        finalise_floor(rows, env)
        table = markdown_table(rows)
        bar.write("\n" + table, file=sys.stdout)

        cost = surgery_cost(provs, env, timer, args, bar) if args.surgery_cost else []
    finally:
        bar.close()
    cost_md = surgery_table(cost)
    if cost_md:
        print()
        print(cost_md)
    elapsed = time.perf_counter() - start
    bws = [b / 1e9 for b in env["copy_samples"]]
    footer = (f"{len(rows)} rows in {elapsed:.0f} s (load average at end {_loadavg()}); copy bandwidth samples "
              f"{min(bws):.1f}-{max(bws):.1f} GB/s, floor at {max(bws):.1f} GB/s. Floor = (2*T*N + N) * bytes at the copy bandwidth; "
              f"max rel err vs a float64 reference; timings on a shared machine are noisy.")
    print()
    print(footer)

    if args.json:
        meta = {k: v for k, v in env.items() if k not in ("device_obj", "copy_samples")}
        meta["copy_gbps_samples"] = [b / 1e9 for b in env["copy_samples"]]
        meta.update(copy_gbps=env["copy_Bps"] / 1e9, quick=args.quick, elapsed_s=elapsed,
                    python=platform.python_version(), mgs_kernels=mgs_kernels.__version__)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows], "surgery_cost": cost}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"{header(env, args)}\n\nCommand: `python bench/run.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n")
            f.write(table + "\n\n")
            if cost_md:
                f.write(cost_md + "\n\n")
            f.write(footer + "\n")
    if args.plot:
        try:
            import plot as plot_mod

            plot_mod.plot([asdict(r) for r in rows], args.plot, title=f"{env['device']}, torch {env['torch']}")
        except ImportError as exc:
            print(f"plot skipped: {exc} (pip install matplotlib)", file=sys.stderr)
    failed = [r for r in rows if r.check != "ok"]
    if failed:
        print(f"CHECK FAILED for {sorted({r.provider for r in failed})}: outputs disagree with the float64 "
              f"reference; their times are not reported.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
