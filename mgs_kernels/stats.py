"""What one surgery step saw, derived from the Gram matrices and weights it already computed.

Every tensor property is computed lazily on the device from [M, T, T] / [M, T] tensors: no extra pass
over the gradients and no host sync unless ``scalars()`` is called.
"""

from __future__ import annotations

from functools import cached_property
from typing import Dict, List, Optional

import torch


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


class SurgeryStats:
    """Diagnostics of one ``resolve()`` / ``backward()``.

    Attributes:
        gram: float32 [M, T, T] per-module Gram matrices of the task gradients.
        weights: float32 [M, T] combination weights applied (1 for excluded modules).
        order: int64 [M, T, T-1] visit order used (None if unknown).
        module_names: [M] names; module_kinds: [M] types ("attn", "mlp", "norm", ...);
        module_layers: [M] block index or None.
        excluded: bool [M] on gram's device, modules excluded from surgery by the user (``exclude=``).
        plain_sum: bool [M], modules that got the plain sum this step (excluded, or outside ``top_k``).
        method: the weighting method's name ("pcgrad", "upgrad", ...).
        method_info: per-module diagnostics of the method (e.g. ``converged`` bool [M] of iterative
            solvers); empty for PCGrad.

    Projection statistics (``coefficients``, ``projected_norms``, ``change_sq``, ``task_change``) are
    defined for PCGrad only; every other property holds for every method.
    """

    def __init__(
        self,
        gram: torch.Tensor,
        weights: torch.Tensor,
        module_names: List[str],
        module_kinds: Optional[List[str]] = None,
        excluded: Optional[torch.Tensor] = None,
        *,
        plain_sum: Optional[torch.Tensor] = None,
        order: Optional[torch.Tensor] = None,
        eps: float = 0.0,
        module_layers: Optional[List[Optional[int]]] = None,
        method: str = "pcgrad",
        method_info: Optional[Dict[str, torch.Tensor]] = None,
    ):
        M = gram.shape[0]
        self.gram = gram
        self.weights = weights
        self.order = order
        self.eps = eps
        self.module_names = list(module_names)
        self.module_kinds = list(module_kinds) if module_kinds is not None else ["other"] * M
        self.module_layers = list(module_layers) if module_layers is not None else [None] * M
        self.excluded = excluded if excluded is not None else torch.zeros(M, dtype=torch.bool, device=gram.device)
        self.plain_sum = plain_sum if plain_sum is not None else self.excluded
        self.method = method
        self.method_info = dict(method_info or {})
        # Set by ModularGradientSurgery.step(max_grad_norm=...): 0-dim min(1, max_norm / (norm + 1e-6)).
        self.clip_coef: Optional[torch.Tensor] = None

    @property
    def num_tasks(self) -> int:
        return self.gram.shape[1]

    @property
    def num_modules(self) -> int:
        return self.gram.shape[0]

    # ---------------------------------------------------------------- per-module tensors
    @cached_property
    def norms(self) -> torch.Tensor:
        """float32 [M, T]: norm of each task's gradient in each module."""
        return torch.diagonal(self.gram, dim1=1, dim2=2).clamp_min(0).sqrt()

    @cached_property
    def cosine(self) -> torch.Tensor:
        """float32 [M, T, T]: cosine similarity of task gradients per module (0 where either is zero)."""
        n = self.norms
        return _safe_div(self.gram, n.unsqueeze(2) * n.unsqueeze(1))

    @cached_property
    def norm_ratio(self) -> torch.Tensor:
        """float32 [M, T, T]: |g_i| / |g_j| per module (0 where |g_j| = 0)."""
        n = self.norms
        return _safe_div(n.unsqueeze(2), n.unsqueeze(1).expand_as(self.gram))

    @cached_property
    def conflicts(self) -> torch.Tensor:
        """bool [M, T, T]: task pairs with a negative inner product (off-diagonal, symmetric)."""
        eye = torch.eye(self.num_tasks, dtype=torch.bool, device=self.gram.device)
        return (self.gram < 0) & ~eye

    @cached_property
    def num_conflicts(self) -> torch.Tensor:
        """int64 [M]: conflicting unordered task pairs per module."""
        return self.conflicts.sum(dim=(1, 2)) // 2

    @cached_property
    def coefficients(self) -> torch.Tensor:
        """float32 [M, T, T]: row i is c_i with g_i' = sum_k c_ik g_k (identity for plain-sum modules).

        Re-derived from ``gram`` and ``order`` by the batched Gram-space solve (M*T^2 work).
        """
        from .order import fixed_order
        from .weighting.pcgrad import pcgrad_coefficients

        if self.method != "pcgrad":
            raise AttributeError(f"coefficients (and projected_norms, task_change) describe PCGrad's projections; "
                                 f"this step used method {self.method!r}")
        M, T = self.num_modules, self.num_tasks
        order = self.order if self.order is not None else fixed_order(M, T, device=self.gram.device)
        coef = pcgrad_coefficients(self.gram.float(), order, self.eps)
        eye = torch.eye(T, device=coef.device).expand_as(coef)
        return torch.where(self.plain_sum[:, None, None], eye, coef)

    @cached_property
    def projected_norms(self) -> torch.Tensor:
        """float32 [M, T]: |g_i'|, each task's gradient norm after surgery."""
        c = self.coefficients
        return torch.einsum("mik,mkl,mil->mi", c, self.gram, c).clamp_min(0).sqrt()

    @cached_property
    def change_sq(self) -> torch.Tensor:
        """float32 [M, T]: |g_i' - g_i|^2, how much surgery moved each task's gradient."""
        delta = self.coefficients - torch.eye(self.num_tasks, device=self.gram.device)
        return torch.einsum("mik,mkl,mil->mi", delta, self.gram, delta).clamp_min(0)

    @cached_property
    def task_change(self) -> torch.Tensor:
        """float32 [M, T]: |g_i' - g_i| / |g_i| (0 where g_i = 0)."""
        return _safe_div(self.change_sq.sqrt(), self.norms)

    @cached_property
    def result_norm(self) -> torch.Tensor:
        """float32 [M]: norm of the combined gradient per module, sqrt(w^T G w)."""
        w = self.weights
        return torch.einsum("mi,mij,mj->m", w, self.gram, w).clamp_min(0).sqrt()

    @cached_property
    def result_cosine(self) -> torch.Tensor:
        """float32 [M, T]: cosine between each module's combined gradient and each task's gradient there
        (0 where either is zero)."""
        w = self.weights.to(self.gram.dtype)
        inner = torch.einsum("mi,mij->mj", w, self.gram)  # result . g_j
        return _safe_div(inner, self.result_norm.unsqueeze(1) * self.norms)

    @cached_property
    def grad_norm(self) -> torch.Tensor:
        """0-dim: global norm of the combined gradient (what clip_grad_norm_ would measure)."""
        return self.result_norm.square().sum().sqrt()

    @cached_property
    def global_gram(self) -> torch.Tensor:
        """float32 [T, T]: Gram matrix of the whole-model task gradients (sum over modules)."""
        return self.gram.sum(0)

    # ---------------------------------------------------------------- aggregates
    def _kind_masks(self) -> Dict[str, torch.Tensor]:
        kinds = sorted(set(self.module_kinds))
        return {
            k: torch.tensor([mk == k for mk in self.module_kinds], dtype=torch.bool, device=self.gram.device)
            for k in kinds
        }

    def scalars(self) -> Dict[str, float]:
        """Flat dict of Python floats for TensorBoard / W&B / verl metrics (one host sync).

        Global: ``mgs/grad_norm``, ``mgs/conflict_pair_fraction`` (over modules x task pairs),
        ``mgs/conflict_module_fraction``, ``mgs/cos/{i}-{j}`` (whole-model cosine),
        ``mgs/task{i}/grad_norm``, ``mgs/task{i}/result_cos`` (whole-model cosine between the combined
        gradient and task i), ``mgs/task{i}/change`` (PCGrad: |g_i' - g_i| / |g_i| over the model),
        ``mgs/norm_ratio_max`` (largest |g_i| / |g_j| of any module). Per module type k:
        ``mgs/{k}/conflict_fraction``, ``mgs/{k}/cosine_mean``, ``mgs/{k}/norm_ratio_max``.
        """
        T, M = self.num_tasks, self.num_modules
        device = self.gram.device
        zero = torch.zeros((), device=device)
        values: Dict[str, torch.Tensor] = {"mgs/grad_norm": self.grad_norm}
        iu_host = torch.triu_indices(T, T, offset=1)
        iu = iu_host.to(device)
        pairs = iu.shape[1]
        if M and pairs:
            conflict_pairs = self.conflicts[:, iu[0], iu[1]].float()  # [M, P]
            cos_pairs = self.cosine[:, iu[0], iu[1]]
            ratio = self.norm_ratio
            values["mgs/conflict_pair_fraction"] = conflict_pairs.mean()
            values["mgs/conflict_module_fraction"] = (conflict_pairs.sum(1) > 0).float().mean()
            values["mgs/norm_ratio_max"] = ratio.amax()
            gg = self.global_gram
            gn = torch.diagonal(gg).clamp_min(0).sqrt()
            gcos = _safe_div(gg, gn[:, None] * gn[None, :])
            for i, j in iu_host.t().tolist():
                values[f"mgs/cos/{i}-{j}"] = gcos[i, j]
            for kind, mask in self._kind_masks().items():
                values[f"mgs/{kind}/conflict_fraction"] = conflict_pairs[mask].mean()
                values[f"mgs/{kind}/cosine_mean"] = cos_pairs[mask].mean()
                values[f"mgs/{kind}/norm_ratio_max"] = ratio[mask].amax()
        else:
            values["mgs/conflict_pair_fraction"] = zero
            values["mgs/conflict_module_fraction"] = zero
        total_sq = torch.diagonal(self.global_gram).clamp_min(0)
        # Whole-model cosine between the combined gradient and each task: sum_m (w_m^T G_m)_t over norms.
        inner = torch.einsum("mi,mij->j", self.weights.to(self.gram.dtype), self.gram) if M else torch.zeros(T, device=device)
        result_cos = _safe_div(inner, self.grad_norm * total_sq.sqrt())
        projection = self.method == "pcgrad"
        if projection:
            change = _safe_div(self.change_sq.sum(0).sqrt(), total_sq.sqrt()) if M else torch.zeros(T, device=device)
        for t in range(T):
            values[f"mgs/task{t}/grad_norm"] = total_sq[t].sqrt()
            values[f"mgs/task{t}/result_cos"] = result_cos[t]
            if projection:
                values[f"mgs/task{t}/change"] = change[t]
        for key, value in self.method_info.items():
            if value.dtype == torch.bool:  # e.g. converged: the fraction of modules
                values[f"mgs/{self.method}/{key}_fraction"] = value.float().mean()
        keys = list(values)
        floats = torch.stack([values[k].float().reshape(()) for k in keys]).tolist()
        return dict(zip(keys, floats))

    def __repr__(self) -> str:
        return f"SurgeryStats(modules={self.num_modules}, tasks={self.num_tasks})"
