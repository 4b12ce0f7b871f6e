"""Triton kernels of mgs_kernels: segmented Gram, batched PCGrad solve, segmented combine.

Use ``kernels()`` rather than importing the submodules directly: ``triton.jit`` decides at decoration
time whether a kernel is compiled (GPU) or run by the CPU interpreter (``TRITON_INTERPRET=1``), so
``kernels()`` (re)imports the kernel modules when that setting changed since they were imported
(e.g. a test module set ``TRITON_INTERPRET=1`` after another one imported this package).

Launchers (plain Python, inputs already validated by ``mgs_kernels.ops``):

    segmented_gram(grads [T, N], plan) -> float32 [M, T, T]
    pcgrad_weights(gram float32 [M, T, T], order int64 [M, T, T-1], eps) -> float32 [M, T]
    segmented_combine(grads [T, N], plan, weights float32 [M, T], out [N]) -> None
    modular_pcgrad(grads, plan, order, eps, out) -> None     (the three above, no host sync)
    fused_step(args: FusedStepArgs) -> None                  (combine + SGD / Adam(W) update, in place)
"""

from __future__ import annotations

import importlib
import threading
import types

from ._config import interpreting

_SUBMODULES = ("_gram", "_solve", "_combine", "_step")
_state = {"mode": None, "ns": None}
_lock = threading.Lock()


def kernels() -> types.SimpleNamespace:
    """The launchers, built for the current TRITON_INTERPRET setting."""
    mode = interpreting()
    ns = _state["ns"]
    if ns is not None and _state["mode"] == mode:
        return ns
    with _lock:
        if _state["ns"] is None or _state["mode"] != mode:
            mods = {}
            stale = False
            for name in _SUBMODULES:  # in dependency order (_solve / _combine / _step import from _gram)
                mod = importlib.import_module(f"{__name__}.{name}")
                # Each module records the mode its triton.jit decorators ran in; re-run them when it
                # differs (and re-run dependents of a reloaded module so they bind its new functions).
                if stale or mod._INTERPRETED != mode:
                    mod = importlib.reload(mod)
                    stale = True
                mods[name] = mod
            _state["ns"] = types.SimpleNamespace(
                segmented_gram=mods["_gram"].segmented_gram,
                pcgrad_weights=mods["_solve"].pcgrad_weights,
                segmented_combine=mods["_combine"].segmented_combine,
                fused_step=mods["_step"].fused_step,
            )
            _state["mode"] = mode
    return _state["ns"]


def segmented_gram(grads, plan, **kw):
    return kernels().segmented_gram(grads, plan, **kw)


def pcgrad_weights(gram, order, eps):
    return kernels().pcgrad_weights(gram, order, eps)


def segmented_combine(grads, plan, weights, out, **kw):
    return kernels().segmented_combine(grads, plan, weights, out, **kw)


def fused_step(args, **kw):
    return kernels().fused_step(args, **kw)


def modular_pcgrad(grads, plan, order, eps, out, **kw):
    """Gram, solve and combine: four launches on the current stream, no host synchronisation."""
    k = kernels()
    gram = k.segmented_gram(grads, plan, **{a: v for a, v in kw.items() if a in ("chunk_size", "force_dot")})
    weights = k.pcgrad_weights(gram, order, eps)
    k.segmented_combine(grads, plan, weights, out, **{a: v for a, v in kw.items() if a == "chunk_size"})
    return out


__all__ = ["kernels", "segmented_gram", "pcgrad_weights", "segmented_combine", "modular_pcgrad", "fused_step"]
