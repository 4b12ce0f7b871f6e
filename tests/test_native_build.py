"""Build-level checks of the native modules: what loaded, no torch C++ symbols linked, CUDA targets.

Set MGS_REQUIRE_NATIVE=cpu,cuda (as CI does) to fail instead of skip when a module is missing. "Required"
means BUILT and importable: the CUDA module imports on any machine (static CUDA runtime), while the cuda
BACKEND is usable only where a driver, a device and a compiled architecture fit (on a machine without a
driver it must show as unavailable, with the reason, and "auto" must skip it).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess

import pytest
import torch

import mgs_kernels
from mgs_kernels import _native, _settings, backends

REQUIRED = set(_settings.get("MGS_REQUIRE_NATIVE"))
MODULES = {"cpu": "mgs_kernels._mgs_cpu", "cuda": "mgs_kernels._mgs_cuda"}
# dynamic-library names and symbol fragments that would tie a module to one torch / CUDA runtime build
FORBIDDEN_LIBS = ("libtorch", "libc10", "libcudart.so", "libtorch_python")
FORBIDDEN_SYMBOLS = ("c10::", "at::", "torch::", "caffe2", "THP")


def _module_file(kind):
    try:
        mod = importlib.import_module(MODULES[kind])
    except ImportError as exc:
        if kind in REQUIRED:
            pytest.fail(f"{MODULES[kind]} is required (MGS_REQUIRE_NATIVE) but does not import: {exc}")
        pytest.skip(f"{MODULES[kind]} not built")
    return mod.__file__


def test_available_backends_reports_what_loaded():
    names = mgs_kernels.available_backends()
    assert "torch" in names
    errors = backends.backend_errors()
    for kind, modname in MODULES.items():
        try:
            importlib.import_module(modname)
            built = True
        except ImportError:
            built = False
        usable = built and (kind != "cuda" or _native.cuda_runtime_error() is None)
        assert (kind in names) == usable, (kind, names, errors.get(kind))
        if not built:
            assert "pip install --no-build-isolation -e ." in errors[kind]
        elif not usable:  # built, but this machine cannot run it: the reason is reported
            assert "cannot run here" in errors[kind] and _native.cuda_runtime_error() in errors[kind]
    for kind in REQUIRED:
        importlib.import_module(MODULES[kind])  # built and importable
        if kind == "cpu":
            assert kind in names, errors.get(kind)


def test_cuda_backend_unusable_without_a_driver_is_skipped_by_auto():
    _module_file("cuda")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    reason = _native.cuda_runtime_error()
    assert reason, "no driver / device here: the CUDA module must say why it cannot run"
    status = backends.backend_status("cuda")
    assert status["cuda"] is not None and reason in status["cuda"]
    with pytest.raises(ImportError, match="cannot run here"):
        _native.cuda()
    assert _native.cuda_probe("cuda:0") is not None
    # "auto" never hands CUDA tensors to a backend that cannot run (here: none can, torch has no device)
    assert "cuda" not in backends.usable_backends(torch.device("cuda"))


def test_missing_module_gives_clear_message():
    with pytest.raises(ImportError, match=r"not available .*pip install --no-build-isolation -e \..*'torch' backend"):
        _native._load("_mgs_does_not_exist", "test")
    # and the torch backend works regardless
    out = mgs_kernels.modular_pcgrad(torch.ones(2, 4), [0, 4], backend="torch")
    assert torch.equal(out, torch.full((4,), 2.0))


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_no_torch_symbols_linked(kind):
    path = _module_file(kind)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not available")
    undefined = subprocess.run([nm, "-D", "-C", "--undefined-only", path], capture_output=True, text=True, check=True)
    bad = [line for line in undefined.stdout.splitlines() if any(s in line for s in FORBIDDEN_SYMBOLS)]
    assert not bad, f"{path} needs torch symbols: {bad[:5]}"
    readelf = shutil.which("readelf")
    if readelf is not None:
        dyn = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
        needed = [line for line in dyn.splitlines() if "(NEEDED)" in line]
        assert needed, dyn
        bad = [line for line in needed if any(lib in line for lib in FORBIDDEN_LIBS)]
        assert not bad, f"{path} links {bad}"


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_dtype_codes_agree(kind):
    _module_file(kind)
    mod = _native.cpu() if kind == "cpu" else _native.cuda_module()
    assert (mod.DTYPE_FLOAT32, mod.DTYPE_BFLOAT16, mod.DTYPE_FLOAT16) == (
        _native.DTYPE_CODES[torch.float32], _native.DTYPE_CODES[torch.bfloat16], _native.DTYPE_CODES[torch.float16])
    assert mod.MAX_TASKS == _native.MAX_TASKS


def test_cpu_module_reports_isa_and_openmp():
    _module_file("cpu")
    lib = _native.cpu()
    assert isinstance(lib.isa(), str) and lib.isa()
    assert lib.OPENMP or os.uname().sysname == "Darwin"


def test_cuda_module_imports_without_a_gpu():
    _module_file("cuda")
    lib = _native.cuda_module()
    info = lib.runtime_info()
    assert "runtime=" in info and "driver=" in info  # never raises, even with no driver
    assert lib.chunk_elems(3) > 0 and lib.partial_size(8) == 36
    archs = os.environ.get("MGS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    for arch in archs:
        arch = arch.strip().replace("sm_", "")
        if arch.isdigit():
            assert f"sm_{arch}" in lib.compiled_archs()
    reason = lib.runtime_error()  # version / attribute queries only: never raises, no context
    assert isinstance(reason, str)
    if not torch.cuda.is_available():
        assert reason
        assert lib.device_error(0) and lib.probe_device(0)
    readelf = shutil.which("readelf")
    if readelf is not None:  # device code is embedded (a fat binary), not left to a runtime compiler
        sections = subprocess.run([readelf, "-S", lib.__file__], capture_output=True, text=True, check=True).stdout
        assert ".nv_fatbin" in sections


def test_fused_step_descriptor_is_one_bound_struct():
    # Every field of csrc/mgs_fused_step.h StepDesc round-trips through the binding (pointers as ints).
    pointers = ["grads", "chunk_start", "chunk_len", "chunk_slot", "slot_first", "active", "slot_weights",
                "param_ptr", "state1_ptr", "state2_ptr", "state3_ptr", "hyper", "grad_out"]
    scalars = ["dtype", "T", "row_stride", "num_chunks", "num_slots", "out_dtype", "kind"]
    mods = []
    for kind in ("cpu", "cuda"):
        try:
            mods.append(_native.cpu() if kind == "cpu" else _native.cuda_module())
        except ImportError:
            pass
    if not mods:
        pytest.skip("no native module built")
    for mod in mods:
        d = mod.FusedStepDesc()
        assert d.grad_out == 0 and d.out_dtype == _native.NO_OUTPUT
        values = {name: (1 << 44) + 16 * i for i, name in enumerate(pointers)}
        values.update({name: 3 + i for i, name in enumerate(scalars)})
        for name, v in values.items():
            setattr(d, name, v)
        assert {name: getattr(d, name) for name in values} == values
        assert "FusedStepDesc(" in repr(d)


def test_cuda_module_has_sm80_and_sm90_code():
    path = _module_file("cuda")
    cuobjdump = shutil.which("cuobjdump") or (
        "/usr/local/cuda/bin/cuobjdump" if os.path.exists("/usr/local/cuda/bin/cuobjdump") else None)
    if cuobjdump is None:
        pytest.skip("cuobjdump not available")
    listing = subprocess.run([cuobjdump, "--list-elf", path], capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip(f"cuobjdump failed: {listing.stderr.strip()}")
    archs = os.environ.get("MGS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    for arch in archs:
        arch = arch.strip().replace("sm_", "")
        if arch:
            assert f"sm_{arch}" in listing.stdout, listing.stdout
