"""``nash_mtl``: Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022,
Alg. 1; torchjd's ``NashMTL``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .._errors import MGSInputError
from ._common import check_float, check_int, quad, trace_normalize
from ._native_solvers import inputs, module_output, native_solver, outputs, threads
from ._newton import alpha_fair, unsolved_to_zero
from .base import State, Weighting, register


@register
class NashMTLWeighting(Weighting):
    """W solves W_i (G W)_i = 1, W > 0, on the tasks present in the module (the Nash bargaining
    solution), then W is scaled down so that |J^T W| = sqrt(W^T G W) <= max_norm.

    Every module's aggregated gradient therefore has norm sqrt(n) before the clip (n present tasks),
    whatever the module's gradient scale: with per-tensor modules and max_norm = 1 every tensor's
    update has norm 1. torchjd's NashMTL reaches the same condition (its cvxpy constraint is
    alpha_i (G alpha)_i >= 1 on the unnormalised G) by convex-concave iterations with ECOS, which stop
    early or fail on some modules; here damped Newton (``_newton``) solves it to 1e-13, warm-started
    from the previous step's weights.

    State (per module): "alpha" float64 [M, T], the last solution before the clip (0: none yet),
    reused on the steps between updates and as the warm start; "step" int64 [M].

    Options:
        max_norm: clip of |J^T W| per module (default 1.0; 0 disables).
        update_weights_every: solve every k-th call, reuse the last weights in between (default 1).
        optim_niter: Newton iterations per solve (default 20); info["converged"] is residual <= 1e-9.
        n_tasks: optional, checked against T.
    """

    name = "nash_mtl"
    scale_invariant = False
    stateful = True

    def __init__(self, n_tasks: Optional[int] = None, max_norm: float = 1.0, update_weights_every: int = 1,
                 optim_niter: int = 20) -> None:
        super().__init__()
        self.n_tasks = None if n_tasks is None else check_int(self.name, "n_tasks", n_tasks, minimum=1)
        self.max_norm = check_float(self.name, "max_norm", max_norm, minimum=0.0)
        self.update_weights_every = check_int(self.name, "update_weights_every", update_weights_every, minimum=1)
        self.optim_niter = check_int(self.name, "optim_niter", optim_niter, minimum=1)
        self._repr_options = {"max_norm": self.max_norm, "update_weights_every": self.update_weights_every,
                              "optim_niter": self.optim_niter}

    def init_state(self, num_modules: int, num_tasks: int, device: torch.device) -> State:
        return {"alpha": torch.zeros(num_modules, num_tasks, dtype=torch.float64, device=device),
                "step": torch.zeros(num_modules, dtype=torch.int64, device=device)}

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        M, T, _ = gram.shape
        if self.n_tasks is not None and self.n_tasks != T:
            raise MGSInputError(f"nash_mtl: n_tasks={self.n_tasks} but the Gram has T = {T} tasks")
        check_state(self.name, state, {"alpha": (M, T), "step": (M,)}, gram.device)
        mod = native_solver(gram, "nash_mtl")
        if mod is not None and _native_state(state):
            return self._native(mod, gram, present, state, info)
        gn, tr = trace_normalize(gram)
        root = torch.where(tr > 0, tr, torch.ones_like(tr)).sqrt()[:, None]
        # On G / tr G the solution is sqrt(tr G) times the one on G.
        w_n, res, iters = alpha_fair(gn, present, 1.0, max_iters=self.optim_niter, w0=state["alpha"] * root)
        # A module with no task present (empty, or non-finite: see Weighting.__call__) keeps its weights.
        solve_now = ((state["step"] % self.update_weights_every) == 0) & present.any(dim=1)
        info["converged"] = torch.where(solve_now, res <= 1e-9, torch.ones_like(solve_now))
        alpha = torch.where(solve_now[:, None], unsolved_to_zero(w_n / root, res <= 1e-9), state["alpha"])
        state["alpha"].copy_(alpha)  # (a zeroed module starts cold at its next solve)
        state["step"].add_(1)
        info["residual"] = torch.where(solve_now, res, torch.zeros_like(res))
        info["iterations"] = torch.where(solve_now, iters, torch.zeros_like(iters))
        if self.max_norm > 0:
            norm = quad(gram, alpha * present.to(alpha.dtype)).clamp_min(0.0).sqrt()
            shrink = torch.where(norm > self.max_norm, self.max_norm / torch.where(norm > 0, norm, torch.ones_like(norm)),
                                 torch.ones_like(norm))
            alpha = alpha * shrink[:, None]
        return alpha

    def _native(self, mod, gram: torch.Tensor, present: torch.Tensor, state: State,
                info: Dict[str, torch.Tensor]) -> torch.Tensor:
        """compute() by csrc/cpu/weighting_nash_mtl.cpp: the same solve, one module per thread, the state
        updated in place through its pointers."""
        g, p = inputs(gram, present)
        M, T, _ = g.shape
        w, conv, iters = outputs(M, T, g.device)
        res = module_output(M, g.device)
        mod.nash_mtl(g.data_ptr(), p.data_ptr(), M, T, self.max_norm, self.update_weights_every, self.optim_niter,
                     state["alpha"].data_ptr(), state["step"].data_ptr(), w.data_ptr(), conv.data_ptr(),
                     res.data_ptr(), iters.data_ptr(), threads())
        info["converged"] = conv
        info["residual"] = res
        info["iterations"] = iters
        return w


def _native_state(state: State) -> bool:
    """Whether the native solver can update ``state`` in place through its pointers (init_state's dtypes,
    contiguous); a state loaded in another layout runs the torch code, which handles any."""
    a, s = state["alpha"], state["step"]
    return (a.dtype == torch.float64 and s.dtype == torch.int64 and a.is_contiguous() and s.is_contiguous()
            and not a.requires_grad)


def check_state(method: str, state: State, shapes: Dict[str, tuple], device: torch.device) -> None:
    """``state`` must hold the keys of ``shapes`` with those shapes, on ``device``."""
    if not isinstance(state, dict):
        raise MGSInputError(f"{method}: state must be the dict made by init_state, got {type(state).__name__}")
    for key, shape in shapes.items():
        t = state.get(key)
        if not isinstance(t, torch.Tensor):
            raise MGSInputError(f"{method}: state has no tensor {key!r} (make it with init_state)")
        if tuple(t.shape) != tuple(shape):
            raise MGSInputError(f"{method}: state[{key!r}] has shape {tuple(t.shape)}, want {tuple(shape)} "
                                "(the module or task count changed: make a new state with init_state)")
        if t.device != device:
            raise MGSInputError(f"{method}: state[{key!r}] is on {t.device} but the Gram is on {device}")
