"""Offline compilation of the Triton kernels exactly as the launchers launch them, without a GPU.

``launches(...)`` runs the real launchers (``segmented_gram``, ``pcgrad_weights``, ``segmented_combine``,
``fused_step``) on CPU tensors with every ``kernel[grid](...)`` call recorded instead of run, so the
block sizes, warps, stages and constexprs are the ones a GPU launch of the same shapes would use
(``_config`` is told the target's shared-memory limit). ``compile_launch`` then specializes the recorded
arguments with Triton's own binder (16-byte alignment of pointers and integers, as at a real launch) and
compiles them for ``GPUTarget("cuda", arch, 32)`` with Triton's bundled ptxas; ``ptxas -v`` reports
registers, spills and shared memory, and the PTX is scanned for vector loads and division instructions.

Must run with ``TRITON_INTERPRET`` unset (kernels decorated for compilation): the offline tests run it in
worker processes. Nothing here is imported by the package at run time.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch

from .. import _fused_step as _fs
from .._plan import plan_from_sizes
from . import _combine, _config, _gram, _solve, _step

# Opt-in shared memory per block (bytes) of the offline targets: H100/H200 (sm_90) and A100 (sm_80).
TARGETS: Dict[int, int] = {90: 232_448, 80: 166_912}

KERNELS = ("gram", "gram_reduce", "solve", "combine", "step_sgd", "step_adam")
# The kernels that stream the [T, N] buffer: no register spills allowed.
HOT_KERNELS = ("gram", "combine", "step_sgd", "step_adam")

_DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Launch:
    kernel: str  # one of KERNELS
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class CompileResult:
    kernel: str
    T: int
    dtype: str
    layout: str  # "aligned" | "unaligned"
    arch: int
    config: str  # the launch's constexprs / options worth printing
    shared: int  # bytes (Triton metadata: what the launch requests)
    smem_limit: int
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    ld_v4: int  # 16-byte vector global loads (ld.global.v4.b32 / ...) in the PTX
    ld_v2: int
    cp_async16: int  # 16-byte asynchronous global -> shared copies (the tl.dot pipeline's loads)
    ld_scalar: int
    div_full: int  # approximate fp32 divisions (div.full.f32 / div.approx.f32)
    div_rn: int  # IEEE fp32 divisions (div.rn.f32)
    specialization: Dict[str, str] = field(default_factory=dict)  # argument -> type (+ "D" when 16-divisible)

    def row(self) -> dict:
        return asdict(self)


class _Recorder:
    def __init__(self, kernel: str, fn, log: List[Launch]):
        self.kernel, self.fn, self.log = kernel, fn, log

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.log.append(Launch(self.kernel, self.fn, tuple(grid), args, dict(kwargs)))

        return record


@contextlib.contextmanager
def _recording(smem_limit: int, kind_of_step: Optional[str] = None):
    """Replace every kernel object of the launcher modules by a recorder; tell _config the target."""
    log: List[Launch] = []
    patches = [
        (_gram, "_gram_partial_kernel", "gram"),
        (_gram, "_gram_reduce_kernel", "gram_reduce"),
        (_solve, "_pcgrad_solve_kernel", "solve"),
        (_combine, "_segmented_combine_kernel", "combine"),
        (_step, "_fused_step_kernel", kind_of_step or "step"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    old_smem = _config.OFFLINE_SMEM_LIMIT
    try:
        for mod, name, kernel in patches:
            setattr(mod, name, _Recorder(kernel, getattr(mod, name), log))
        _config.OFFLINE_SMEM_LIMIT = smem_limit
        yield log
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        _config.OFFLINE_SMEM_LIMIT = old_smem


LAYOUTS = ("aligned", "offset", "unaligned")


def _task_rows(T: int, N: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """[T, N] task rows. "aligned": 16-byte aligned base, row stride padded to 64 elements (the surgery's
    buffer); "offset": the same rows viewed from their second column (``buf[:, 1:]``, a base one element
    past a 16-byte boundary, rows still aligned with each other); "unaligned": an odd row stride and a
    misaligned base (rows differ in alignment: only scalar code can read them)."""
    if layout == "aligned":
        stride = -(-N // 64) * 64
        return torch.zeros(T, stride, dtype=dtype)[:, :N]
    if layout == "offset":
        stride = -(-(N + 1) // 64) * 64
        return torch.zeros(T, stride, dtype=dtype)[:, 1 : N + 1]
    if layout == "unaligned":
        return torch.zeros(T, N + 2, dtype=dtype)[:, 1 : N + 1]  # stride N + 2 (odd N), base + 1 element
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _step_args(grads: torch.Tensor, kind: int, layout: str, out: bool) -> SimpleNamespace:
    """A FusedStepArgs-like object over three slots (a full chunk, an odd-sized one, the rest) with fp32
    parameters / states aligned ("aligned", "offset") or one element off ("unaligned")."""
    T, N = grads.shape
    sizes = [_fs.SLOT_CHUNK, 4097, 5]
    sizes[-1] = N - sizes[0] - sizes[1]
    chunks = plan_from_sizes(sizes).chunk_table(_fs.SLOT_CHUNK, torch.device("cpu"))
    S = len(sizes)
    off = 1 if layout == "unaligned" else 0

    def f32(n):
        return torch.zeros(n + off)[off:]

    params = [f32(n) for n in sizes]
    states = [[f32(n), f32(n) if kind == _fs.ADAM_KIND else None, f32(n) if kind == _fs.ADAM_KIND else None]
              for n in sizes]  # fmt: skip
    ptr = lambda ts: torch.tensor([t.data_ptr() if t is not None else 0 for t in ts], dtype=torch.int64)  # noqa: E731
    return SimpleNamespace(
        kind=kind, grads=grads, chunks=chunks, num_slots=S,
        active=torch.ones(S, dtype=torch.int32), slot_weights=torch.ones(S, T), hyper=torch.zeros(S, _fs.NUM_HYPER),
        param_ptr=ptr(params), state1_ptr=ptr([s[0] for s in states]), state2_ptr=ptr([s[1] for s in states]),
        state3_ptr=ptr([s[2] for s in states]), grad_out=torch.zeros(N, dtype=grads.dtype) if out else None,
        param_tensors=params, state_tensors=states, _keep=(params, states),
    )  # fmt: skip


def launches(T: int, dtype: str, layout: str, arch: int = 90) -> List[Launch]:
    """Every kernel launch of one Gram + solve + combine and one SGD and one Adam fused step (grad_out
    kept) for T tasks of storage ``dtype`` ("fp32" / "bf16" / "fp16") in ``layout``, as the launchers
    issue them for a device with the shared-memory limit of ``arch``."""
    td = _DTYPE_NAMES[dtype]
    sizes = [3 * _fs.SLOT_CHUNK + 5, 0, 4097, 1]  # several chunks, an empty module, odd sizes
    N = sum(sizes)
    grads = _task_rows(T, N, td, layout)
    plan = plan_from_sizes(sizes)
    out: List[Launch] = []
    with _recording(TARGETS[arch]) as log:
        gram = _gram.segmented_gram(grads, plan)
        order = torch.zeros(plan.num_modules, T, max(T - 1, 0), dtype=torch.int64)
        _solve.pcgrad_weights(gram, order, 0.0)
        _combine.segmented_combine(grads, plan, torch.ones(plan.num_modules, T), torch.empty(N, dtype=td))
    out += log
    for kind, name in ((_fs.SGD_KIND, "step_sgd"), (_fs.ADAM_KIND, "step_adam")):
        with _recording(TARGETS[arch], name) as log:
            _step.fused_step(_step_args(grads, kind, layout, out=True))
        out += log
    return out


def _ptxas_numbers(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"no ptxas resource report in:\n{log}")
    stack, st, ld = (int(v) for v in spills[-1])
    return {"regs": int(regs[-1]), "stack": stack, "spill_stores": st, "spill_loads": ld}


def _ptx_numbers(ptx: str) -> dict:
    return {
        "ld_v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx)),
        "ld_v2": len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.", ptx)),
        "cp_async16": len(re.findall(r"cp\.async\.c[ag](?:\.\w+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(?:0x10|16)\b", ptx)),
        "ld_scalar": len(re.findall(r"ld\.global(?:\.(?!v[248]\b)\w+)*\.[bfsu]\d+\s", ptx)),
        "div_full": len(re.findall(r"div\.(?:full|approx)(?:\.ftz)?\.f32", ptx)),
        "div_rn": len(re.findall(r"div\.rn(?:\.ftz)?\.f32", ptx)),
    }


def _config_text(launch: Launch) -> str:
    keep = ("T_PAD", "BLOCK_N", "USE_DOT", "PRECISION", "T_BLOCK", "TT_BLOCK", "C_BLOCK", "COL_VEC", "HAS_OUT",
            "num_warps", "num_stages")
    kw = dict(launch.kwargs)
    if not (kw.get("USE_DOT") and kw.get("UPCAST")):
        kw.pop("PRECISION", None)  # only float32 operands of tl.dot have an input precision
    return " ".join(f"{k}={v}" for k, v in kw.items() if k in keep)


def compile_launch(launch: Launch, T: int, dtype: str, layout: str, arch: int) -> CompileResult:
    """Compile one recorded launch for sm_<arch> (as JITFunction.run would for these arguments)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = False
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    spec = {}
    for (name, _), (ty, key) in zip(bound.items(), specialization):
        if ty != "constexpr":
            spec[name] = ty + ("/D" if isinstance(key, str) and "D" in key else "")
    old = knobs.nvidia.dump_ptxas_log
    buf = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)  # fmt: skip
    finally:
        knobs.nvidia.dump_ptxas_log = old
    log = buf.getvalue()
    if "bytes stack frame" not in log:  # a Triton cache hit does not run ptxas: ask it (or our cache)
        log = _cached_ptxas_log(kernel, arch, options)
    return CompileResult(
        kernel=launch.kernel, T=T, dtype=dtype, layout=layout, arch=arch, config=_config_text(launch),
        shared=int(kernel.metadata.shared), smem_limit=TARGETS[arch], specialization=spec,
        **_ptxas_numbers(log), **_ptx_numbers(kernel.asm["ptx"]),
    )  # fmt: skip


def _cached_ptxas_log(kernel, arch: int, options) -> str:
    """ptxas -v output for a kernel from Triton's cache, kept next to Triton's cache by kernel hash."""
    import os

    from triton import knobs

    d = os.path.join(knobs.cache.dir, "mgs_kernels_ptxas")
    path = os.path.join(d, f"{kernel.hash}_{arch}.log")
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        pass
    log = _run_ptxas(kernel.asm["ptx"], arch, options)
    try:
        os.makedirs(d, exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(log)
        os.replace(tmp, path)
    except OSError:
        pass
    return log


def _run_ptxas(ptx: str, arch: int, options) -> str:
    import os
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
               src, "-o", os.path.join(d, "k.o")]  # fmt: skip
        if not options.enable_fp_fusion:
            cmd.insert(1, "--fmad=false")
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_case_tuple(case: tuple) -> List[dict]:
    """``compile_case(*case)``: the picklable entry point of worker processes."""
    return compile_case(*case)


def compile_case(T: int, dtype: str, layout: str, arch: int, kernels=KERNELS) -> List[dict]:
    """Compile every launch of ``launches(T, dtype, layout, arch)`` whose kernel is in ``kernels``."""
    rows = []
    for launch in launches(T, dtype, layout, arch):
        if launch.kernel in kernels:
            rows.append(compile_launch(launch, T, dtype, layout, arch).row())
    return rows
