"""What one surgery step saw, derived from the Gram matrices and weights it already computed.

Every tensor property is computed lazily on the device, from [M, T, T] and [M, T] tensors only: no
extra pass over the gradients and no host sync unless ``scalars()`` is called.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch


class SurgeryStats:
    """Diagnostics of one ``resolve()`` / ``backward()``.

    Attributes:
        gram: float32 [M, T, T] per-module Gram matrices of the task gradients.
        weights: float32 [M, T] combination weights applied (1 for excluded modules).
        module_names: [M] names, module_kinds: [M] types, excluded: bool [M] (on gram's device).
    """

    def __init__(
        self,
        gram: torch.Tensor,
        weights: torch.Tensor,
        module_names: List[str],
        module_kinds: Optional[List[str]] = None,
        excluded: Optional[torch.Tensor] = None,
    ):
        self.gram = gram
        self.weights = weights
        self.module_names = list(module_names)
        self.module_kinds = list(module_kinds) if module_kinds is not None else ["other"] * len(module_names)
        M = gram.shape[0]
        self.excluded = excluded if excluded is not None else torch.zeros(M, dtype=torch.bool, device=gram.device)

    @property
    def num_tasks(self) -> int:
        return self.gram.shape[1]

    @property
    def norms(self) -> torch.Tensor:
        """[M, T] per-module norm of each task's gradient."""
        return torch.diagonal(self.gram, dim1=1, dim2=2).clamp_min(0).sqrt()

    @property
    def cosine(self) -> torch.Tensor:
        """[M, T, T] cosine similarity of task gradients per module (0 where either is zero)."""
        n = self.norms
        denom = n.unsqueeze(2) * n.unsqueeze(1)
        return torch.where(denom > 0, self.gram / torch.where(denom > 0, denom, 1.0), 0.0)

    @property
    def conflicts(self) -> torch.Tensor:
        """bool [M, T, T]: task pairs whose gradients conflict (negative inner product), off-diagonal."""
        T = self.num_tasks
        eye = torch.eye(T, dtype=torch.bool, device=self.gram.device)
        return (self.gram < 0) & ~eye

    @property
    def num_conflicts(self) -> torch.Tensor:
        """int64 [M]: conflicting unordered task pairs per module."""
        return self.conflicts.sum(dim=(1, 2)) // 2

    @property
    def result_norm(self) -> torch.Tensor:
        """[M] norm of the combined gradient per module, sqrt(w^T G w)."""
        w = self.weights
        return torch.einsum("mi,mij,mj->m", w, self.gram, w).clamp_min(0).sqrt()

    def scalars(self) -> Dict[str, float]:
        """Flat dict of Python floats for loggers (one host sync)."""
        T = self.num_tasks
        pairs = T * (T - 1) // 2
        M = self.gram.shape[0]
        conflicted = (self.num_conflicts > 0).float()
        vals = torch.stack(
            [
                conflicted.mean() if M else torch.zeros((), device=self.gram.device),
                self.num_conflicts.sum().float(),
                self.result_norm.square().sum().sqrt(),
            ]
        ).tolist()
        return {
            "mgs/conflict_module_fraction": vals[0],
            "mgs/conflict_pairs": vals[1],
            "mgs/conflict_pair_fraction": vals[1] / (M * pairs) if M and pairs else 0.0,
            "mgs/grad_norm": vals[2],
        }

    def __repr__(self) -> str:
        return f"SurgeryStats(modules={len(self.module_names)}, tasks={self.num_tasks})"
