"""Build script for mgs_kernels.

The Python package always installs. Native extensions (csrc/ + python_api/):

* ``mgs_kernels._mgs_cpu``  C++17 + OpenMP kernels, built by default (any C++ compiler with OpenMP).
* ``mgs_kernels._mgs_cuda`` CUDA kernels, built when ``nvcc`` is found. The ``.cu`` file is compiled by
  nvcc here (no ``torch.utils.cpp_extension``), the binding by the host compiler, and the CUDA runtime is
  linked statically: neither module links libtorch / libc10 / libcudart.so.

Environment variables:

* ``MGS_BUILD_CPU``   ``auto`` (default: build; on failure warn and install without it) | ``1`` (failure is
  an error) | ``0`` (skip).
* ``MGS_BUILD_CUDA``  ``auto`` (default: build when nvcc is found; on failure warn) | ``1`` (nvcc required,
  failure is an error) | ``0`` (skip).
* ``MGS_CUDA_ARCHS``  target architectures, ``;`` or ``,`` separated (default ``80;90``); ``90a`` style
  suffixes allowed. SASS for each, plus PTX of the highest for newer GPUs.
* ``MGS_NVCC``        path to nvcc (default: ``$CUDA_HOME/bin/nvcc``, then ``nvcc`` on PATH, then
  ``/usr/local/cuda/bin/nvcc``). ``MGS_NVCC_FLAGS``: extra nvcc flags. ``MGS_NVCC_THREADS``: nvcc --threads
  (default 2).
* ``MGS_CXX_FLAGS``   extra host compiler flags for both modules (shipped builds never use -march=native).
* ``MGS_BUILD_JOBS``  extensions built in parallel (default 2).

``pip install --no-build-isolation -e .`` works with CPU-only torch and no GPU.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _mode(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("1", "true", "yes", "on", "force"):
        return "1"
    if value in ("0", "false", "no", "off", "skip"):
        return "0"
    if value != "auto":
        raise SystemExit(f"{name} must be auto, 1 or 0, got {value!r}")
    return "auto"


BUILD_CPU = _mode("MGS_BUILD_CPU")
BUILD_CUDA = _mode("MGS_BUILD_CUDA")


def _find_nvcc():
    candidates = [os.environ.get("MGS_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _cuda_lib_dirs(nvcc):
    """Library directories of the toolkit that owns ``nvcc`` (it may be a wrapper script)."""
    tops = []
    try:
        # a dry run prints the toolkit root (TOP=...); the source file need not exist
        dry = subprocess.run([nvcc, "--dryrun", "-c", "mgs_probe.cu", "-o", "mgs_probe.o"],
                             capture_output=True, text=True, timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            m = re.match(r"#\$ TOP=(.*)$", line.strip())
            if m:
                tops.append(os.path.normpath(m.group(1)))
    except (OSError, subprocess.SubprocessError):
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            tops.append(os.environ[var])
    tops.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    dirs = []
    for top in tops:
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib")):
            d = os.path.join(top, sub)
            if os.path.isfile(os.path.join(d, "libcudart_static.a")) and d not in dirs:
                dirs.append(d)
    return dirs


def _gencode_flags(archs: str):
    items = [a.strip().replace("sm_", "").replace("compute_", "") for a in re.split(r"[;, ]+", archs) if a.strip()]
    if not items:
        raise SystemExit("MGS_CUDA_ARCHS is empty")
    flags = []
    for a in items:
        if not re.fullmatch(r"\d+[af]?", a):
            raise SystemExit(f"MGS_CUDA_ARCHS: bad architecture {a!r} (use e.g. 80;90)")
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = max(items, key=lambda a: int(re.match(r"\d+", a).group()))
    if top.isdigit():  # arch-specific (90a) targets have no forward-compatible PTX
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def _host_flags(compiler_type: str):
    extra = shlex.split(os.environ.get("MGS_CXX_FLAGS", ""))
    if compiler_type == "msvc":
        return ["/O2", "/std:c++17", "/openmp"] + extra, []
    # -fno-math-errno: sqrt in the fused Adam loop vectorizes (nothing here reads errno)
    cflags = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=fast", "-fno-math-errno"]
    lflags = []
    if sys.platform != "darwin":  # Apple clang has no -fopenmp; the kernels then run on one thread
        cflags.append("-fopenmp")
        lflags.append("-fopenmp")
    return cflags + extra, lflags


class BuildExt(build_ext):
    """Builds the CPU module with the host compiler and the CUDA module with nvcc + the host compiler.

    A module whose build mode is "auto" that fails to build is skipped with a warning: the package then
    installs without it and mgs_kernels falls back to the torch backend.
    """

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = int(os.environ.get("MGS_BUILD_JOBS", "2"))

    def build_extensions(self):
        try:
            import pybind11
        except ImportError:
            pybind11 = None
        kept = []
        for ext in self.extensions:
            mode = getattr(ext, "mgs_mode", "1")
            if pybind11 is None:
                if mode == "1":
                    raise RuntimeError("pybind11 is needed to build the native modules: pip install pybind11")
                warnings.warn(f"pybind11 not found: skipping {ext.name}", stacklevel=2)
                continue
            ext.include_dirs.append(pybind11.get_include())
            cflags, lflags = _host_flags(self.compiler.compiler_type)
            ext.extra_compile_args = cflags + ext.extra_compile_args
            ext.extra_link_args = lflags + ext.extra_link_args
            kept.append(ext)
        self.extensions = kept
        self._mgs_failed = set()
        super().build_extensions()
        # a skipped ("auto") module must not be copied or listed as an output
        self.extensions = [e for e in self.extensions if e.name not in self._mgs_failed]

    def build_extension(self, ext):
        mode = getattr(ext, "mgs_mode", "1")
        try:
            if getattr(ext, "mgs_cuda", False):
                self._compile_cuda(ext)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if mode == "1":
                raise
            msg = f"mgs_kernels: building {ext.name} failed ({type(exc).__name__}: {exc}); installing without it"
            warnings.warn(msg, stacklevel=2)
            print(msg, file=sys.stderr)
            self._mgs_failed.add(ext.name)

    def _compile_cuda(self, ext):
        nvcc = ext.mgs_nvcc
        objects = []
        os.makedirs(self.build_temp, exist_ok=True)
        for src in ext.mgs_cu_sources:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                   "--threads", os.environ.get("MGS_NVCC_THREADS", "2")]
            cmd += _gencode_flags(os.environ.get("MGS_CUDA_ARCHS", "80;90"))
            cmd += shlex.split(os.environ.get("MGS_NVCC_FLAGS", ""))
            cmd += ["-c", os.path.join(ROOT, src), "-o", obj]
            newer = not os.path.exists(obj) or os.path.getmtime(obj) < max(
                os.path.getmtime(os.path.join(ROOT, p)) for p in (src, "csrc/cuda/mgs_cuda.h", "csrc/mgs_fused_step.h"))
            if newer or self.force:
                print(" ".join(shlex.quote(c) for c in cmd), flush=True)
                subprocess.check_call(cmd)
            objects.append(obj)
        lib_dirs = _cuda_lib_dirs(nvcc)
        if not lib_dirs:
            raise RuntimeError(f"libcudart_static.a not found for {nvcc}; set CUDA_HOME")
        ext.extra_objects = objects + list(ext.extra_objects)
        ext.library_dirs = lib_dirs + list(ext.library_dirs)
        ext.libraries = ["cudart_static", "dl", "rt", "pthread"] + list(ext.libraries)


# The native CPU solvers of the weighting methods (csrc/cpu/mgs_weighting.h), one file per solver family.
WEIGHTING_SOURCES = ["csrc/cpu/weighting_frank_wolfe.cpp", "csrc/cpu/weighting_cagrad.cpp",
                     "csrc/cpu/weighting_projection.cpp", "csrc/cpu/weighting_newton.cpp",
                     "csrc/cpu/weighting_fairgrad.cpp", "csrc/cpu/weighting_nash_mtl.cpp",
                     "csrc/cpu/weighting_jacobi.cpp", "csrc/cpu/weighting_aligned_mtl.cpp",
                     "csrc/cpu/weighting_spectral.cpp"]


def _extensions():
    exts = []
    if BUILD_CPU != "0":
        cpu = Extension(
            "mgs_kernels._mgs_cpu",
            sources=["csrc/cpu/mgs_cpu.cpp", "python_api/mgs_cpu_module.cpp", "python_api/weighting_bindings.cpp"]
            + WEIGHTING_SOURCES,
            depends=["csrc/cpu/mgs_cpu.h", "csrc/cpu/mgs_weighting.h", "csrc/cpu/weighting_dense.h",
                     "csrc/cpu/weighting_lcp.h", "csrc/cpu/weighting_newton.h", "csrc/cpu/weighting_jacobi.h",
                     "csrc/cpu/weighting_spectral.h",
                     "csrc/mgs_fused_step.h",
                     "python_api/fused_step_desc.h"],
            language="c++",
        )
        cpu.mgs_mode = BUILD_CPU
        exts.append(cpu)
    if BUILD_CUDA != "0":
        nvcc = _find_nvcc()
        if nvcc is None:
            if BUILD_CUDA == "1":
                raise SystemExit("MGS_BUILD_CUDA=1 but nvcc was not found (set MGS_NVCC or CUDA_HOME)")
            print("mgs_kernels: nvcc not found, building without the CUDA module", file=sys.stderr)
        else:
            cuda = Extension(
                "mgs_kernels._mgs_cuda",
                sources=["python_api/mgs_cuda_module.cpp"],
                depends=["csrc/cuda/mgs_cuda.h", "csrc/cuda/mgs_cuda.cu", "csrc/mgs_fused_step.h",
                         "python_api/fused_step_desc.h"],
                language="c++",
            )
            cuda.mgs_mode = BUILD_CUDA
            cuda.mgs_cuda = True
            cuda.mgs_nvcc = nvcc
            cuda.mgs_cu_sources = ["csrc/cuda/mgs_cuda.cu"]
            exts.append(cuda)
    return exts


setup(
    name="mgs_kernels",
    version="0.1.0",
    description="Fast, exact Modular Gradient Surgery (per-module PCGrad) kernels for multi-task LLM training",
    packages=find_packages(include=["mgs_kernels", "mgs_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "transformers>=4.56", "trl>=1.0", "matplotlib", "tqdm",
                 "ruff", "torchjd[full]==0.18.0"],
        "bench": ["tqdm", "matplotlib", "transformers>=4.56"],  # progress bar, --plot, the surgery-cost model
        "integrations": ["transformers>=4.56", "accelerate", "datasets", "trl>=1.0"],
        "plot": ["matplotlib"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
