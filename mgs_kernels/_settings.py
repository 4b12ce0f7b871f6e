"""Every ``MGS_*`` environment variable the package, its tests and its benchmarks read at run time: one
table, parsed and validated here (a bad value raises ``ValueError`` naming the variable).

Build-time variables (``MGS_BUILD_CPU``, ``MGS_BUILD_CUDA``, ``MGS_CUDA_ARCHS``, ``MGS_NVCC``,
``MGS_NVCC_FLAGS``, ``MGS_NVCC_THREADS``, ``MGS_CXX_FLAGS``, ``MGS_BUILD_JOBS``) are read by setup.py,
which runs before the package exists; README lists both kinds in one table.

Values are read when asked for (``get``), not at import, so a test or a launcher may set them late.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[str], Any]
    doc: str


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(float(text))
        if value < lo:
            raise ValueError(f"must be >= {lo}")
        return value

    return parse


def _byte_count(text: str) -> int:
    return max(int(float(text)), 0)  # a negative budget means "no blocking", like 0


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {list(options)}")
        return text

    return parse


def _flag(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 0 or 1")


def _backend_list(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in ("cpu", "cuda")]
    if unknown:
        raise ValueError(f"lists unknown native modules {unknown} (cpu, cuda)")
    return names


_TABLE = [
    Setting("MGS_CPU_CACHE_BYTES", None, _byte_count,
            "cpu backend: cache budget in bytes of the cache-blocked modular_pcgrad (0 or less: two plain passes; "
            "unset: sized from the machine's caches)"),
    Setting("MGS_TRITON_FP32_DOT", "tf32x3", _choice("tf32x3", "ieee"),
            "triton backend: precision of the tensor-core Gram on float32 storage (tf32x3: three TF32 products, "
            "about fp32 accuracy; ieee: exact FMA on CUDA cores)"),
    Setting("MGS_TRITON_GRAM_DOT_MIN_T", 9, _int_at_least(1),
            "triton backend: task count from which the Gram uses tl.dot tiles instead of FMA outer products"),
    Setting("MGS_TRITON_CHUNK", 256, _int_at_least(1),
            "triton backend under TRITON_INTERPRET=1 only: elements per chunk (small, to keep CPU tests fast)"),
    Setting("MGS_SELF_CHECK", True, _flag,
            "backend=\"auto\": run a tiny parity check of a native GPU backend the first time it is chosen for a "
            "device in a process, falling back with a warning if it fails (0: skip the check)"),
    Setting("MGS_VERL_OPTIONS", None, str,
            "verl: a JSON object of register_engine arguments (task_names, task_key, surgery options); importing "
            "mgs_kernels.integrations.verl with it set registers the MGS engine (for Ray workers' runtime_env)"),
    Setting("MGS_TEST_SEED", None, _int_at_least(0),
            "tests: replay the random inputs of a run (the seed each test prints)"),
    Setting("MGS_HYPOTHESIS_SCALE", 1, _int_at_least(1),
            "tests: multiply the examples of the hypothesis property tests (a local soak for rare cases)"),
    Setting("MGS_REQUIRE_NATIVE", (), _backend_list,
            "tests: native modules that must be built (e.g. cpu,cuda in CI); otherwise their tests skip"),
    Setting("MGS_OFFLINE_FULL", False, _flag,
            "tests/test_offline_compile.py: compile every task count for every kernel (default: the streaming "
            "kernels at a representative subset)"),
    Setting("MGS_OFFLINE_TABLE", None, str,
            "tests/test_offline_compile.py: also write the compile table as Markdown to this path"),
    Setting("MGS_OFFLINE_WORKERS", 2, _int_at_least(1),
            "tests/test_offline_compile.py: parallel compile processes"),
    Setting("MGS_BENCH_N", None, _int_at_least(1),
            "bench/test_bench_ops.py: elements of the benchmarked layout"),
]

SETTINGS: Dict[str, Setting] = {s.name: s for s in _TABLE}


def get(name: str) -> Any:
    """The value of setting ``name`` from the environment (its default when unset or empty)."""
    setting = SETTINGS[name]
    text = os.environ.get(name, "").strip()
    if not text:
        return setting.default
    try:
        return setting.parse(text)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={text!r} {exc} ({setting.doc})") from None


def table() -> str:
    """Markdown table of the run-time settings (README's table is generated from it)."""
    rows = ["| variable | default | what it does |", "| --- | --- | --- |"]
    for s in _TABLE:
        default = "unset" if s.default in (None, ()) else {True: "1", False: "0"}.get(s.default, str(s.default))
        rows.append(f"| `{s.name}` | {default} | {s.doc} |")
    return "\n".join(rows)


def validate_all() -> Optional[str]:
    """Parse every setting; None when all are valid, else the first error message."""
    for name in SETTINGS:
        try:
            get(name)
        except ValueError as exc:
            return str(exc)
    return None
