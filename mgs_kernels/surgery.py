"""Model-level API: capture true per-task gradients into one flat [T, N] buffer, then resolve them
with modular PCGrad straight into ``param.grad``."""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from . import _fused_step, backends
from ._errors import MGSInputError
from ._validate import check_eps
from .distributed import DistContext, is_dtensor, unwrap_ddp
from .order import check_order, fixed_order, random_order
from .partition import ExcludeSpec, PartitionSpec, build_partition, local_tensor
from .stats import SurgeryStats


class ModularGradientSurgery:
    """Per-module PCGrad for a model trained on ``num_tasks`` tasks.

    Two ways to use it::

        s = ModularGradientSurgery(model, num_tasks=3, partition="module")
        stats = s.backward([loss_math, loss_code, loss_chat])   # result left in p.grad
        optimizer.step()

        with s.capture(task):       # any number of backward calls per task (micro-batches accumulate)
            loss.backward()
        stats = s.resolve()         # combined gradient written into p.grad; optimizer untouched

    Args:
        model: the module whose trainable parameters get surgery (one device).
        num_tasks: T >= 1.
        partition: "tensor" | "module" | "layer" | "global" | callable name -> key (see ``partition``).
        order: "random" (reproducible from ``seed``, a fresh draw every step), "fixed", or an int64
            table [M, T, T-1] used every step.
        seed: seed of the random order (drawn on the CPU, so every device and rank sees one table).
        dtype: storage dtype of the task buffer (default: the parameters' dtype if they share one,
            else float32). When it equals the parameters' dtype, gradients land in the buffer with no
            copy: ``p.grad`` points at views of the task's row while a task is captured.
        backend: "auto" | "torch" | "cpu" | "cuda" | "triton".
        exclude: module-name patterns that get the plain sum (see ``build_partition``).
        eps: conflict test ``g_i' . g_j < 0 and |g_j|^2 > eps``.
        top_k: apply surgery only to the ``top_k`` modules whose summed task gradient (the plain
            update, norm sqrt(1^T G 1)) is largest this step; the others get the plain sum (the paper's
            "top-norm modules" ablation). Chosen on device from the Gram matrices, no host sync.
        check_alignment: verify at ``resolve()`` that every rank ran the same task windows (one
            32-byte all-reduce). Default: on for FSDP2 models, off for DDP (no communication beyond
            DDP's own), irrelevant in a single process.

    Multi-GPU: pass an FSDP2 model (``fully_shard``; parameters are DTensors) or a
    ``DistributedDataParallel`` model as it is. See ``mgs_kernels.distributed``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_tasks: int,
        partition: PartitionSpec = "tensor",
        order: Union[str, torch.Tensor] = "random",
        seed: int = 0,
        dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
        exclude: ExcludeSpec = None,
        eps: float = 0.0,
        top_k: Optional[int] = None,
        check_alignment: Optional[bool] = None,
    ):
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise MGSInputError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        self.model = model
        self.num_tasks = num_tasks
        inner, ddp_group = unwrap_ddp(model)
        self.partition = build_partition(inner, partition, exclude)
        self.eps = check_eps(eps)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise MGSInputError(f"top_k must be None or an int >= 0, got {top_k!r}")
        self.top_k = top_k
        slots = self.partition.slots
        self.dist = DistContext.detect(inner, ddp_group, [(s.name, s.param) for s in slots], check_alignment)
        devices = {s.param.device for s in slots}
        if len(devices) != 1:
            raise MGSInputError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        param_dtypes = {s.param.dtype for s in slots}
        if dtype is None:
            dtype = param_dtypes.pop() if len(param_dtypes) == 1 else torch.float32
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise MGSInputError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.dtype = dtype
        # Zero-copy capture points p.grad at a view of the buffer, which needs p's dtype and a plain
        # tensor; otherwise (other dtype, FSDP2's DTensor grads) gradients are added into the task row
        # when the capture window closes.
        self._zero_copy = self.dist.kind != "fsdp" and all(s.param.dtype == dtype for s in slots)
        M, T, N = self.partition.num_modules, num_tasks, self.partition.numel
        self.backend = backend
        self._backend = backends.get_backend(backend, self.device)
        # The table used every step (explicit or "fixed"), or None: draw a fresh one per step ("random").
        if isinstance(order, torch.Tensor):
            check_order(order, M, T, order.device)
            order = order.to(self.device)
            self._static_order: Optional[torch.Tensor] = order
        elif order == "fixed":
            self._static_order = fixed_order(M, T, device=self.device)
        elif order == "random":
            self._static_order = None
        else:
            raise MGSInputError(f"order must be 'random', 'fixed' or an int64 tensor [M, T, T-1], got {order!r}")
        self.order = order
        self._generator = torch.Generator().manual_seed(seed)

        self.buffer = torch.zeros(T, N, dtype=dtype, device=self.device)
        self._out: Optional[torch.Tensor] = None
        self._out_views: Optional[List[torch.Tensor]] = None
        self._excluded = torch.tensor(self.partition.excluded, dtype=torch.bool, device=self.device)
        self._row_views: List[List[torch.Tensor]] = [
            [self.buffer[t, s.start : s.end].view(s.shape) for s in slots] for t in range(T)
        ]
        self._touched = [False] * len(slots)
        self._windows: List[int] = []  # task of every capture window this step (alignment check)
        # What every rank must agree on (checked once under torch.distributed); global shapes, so equal
        # on every rank whatever its shards.
        self._table_signature = repr((T, self.partition.names, self.partition.excluded,
                                      [(s.name, tuple(s.param.shape)) for s in slots]))
        self._task: Optional[int] = None
        self._stale = False  # set by resolve(): the next capture starts a new step
        self._hooks = []
        if self._zero_copy:
            for i, s in enumerate(slots):
                self._hooks.append(s.param.register_hook(self._make_pre_hook(i)))
                self._hooks.append(s.param.register_post_accumulate_grad_hook(self._make_post_hook(i)))

    # ------------------------------------------------------------------ capture
    # Zero-copy mode keeps one invariant inside a window: p.grad IS the task row's view. The pre-hook
    # (before autograd accumulates) restores it if someone set p.grad to None or replaced it; the
    # post-hook folds an out-of-place accumulation (create_graph=True) back into the view.
    def _make_pre_hook(self, index: int):
        def pre_hook(grad: torch.Tensor) -> None:
            task = self._task
            if task is None:
                return None
            param = self.partition.slots[index].param
            view = self._row_views[task][index]
            current = param.grad
            if current is not view:
                if current is not None:
                    view.add_(current.detach())
                param.grad = view
            return None

        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(param: torch.Tensor) -> None:
            task = self._task
            if task is None:
                return  # a backward outside any capture window is none of our business
            self._touched[index] = True
            view = self._row_views[task][index]
            if param.grad is not view:
                view.copy_(param.grad.detach())
                param.grad = view

        return post_hook

    def _check_task(self, task) -> int:
        if isinstance(task, bool) or not isinstance(task, int):
            raise MGSInputError(f"task id must be an int in [0, {self.num_tasks}), got {task!r}")
        if not 0 <= task < self.num_tasks:
            raise MGSInputError(f"task id {task} out of range: num_tasks is {self.num_tasks}")
        return task

    @contextlib.contextmanager
    def capture(self, task: int) -> Iterator[None]:
        """Inside this window, every backward adds into task ``task``'s gradient.

        Windows for the same task accumulate (micro-batches, interleaved tasks); the first window
        after a ``resolve()`` starts a new step with all task gradients at zero.
        """
        self._check_task(task)
        if self._task is not None:
            raise MGSInputError(f"capture({task}) inside capture({self._task}): windows cannot nest")
        if self._stale:
            self._reset()
        self._task = task
        self._windows.append(task)
        slots = self.partition.slots
        views = self._row_views[task]
        for s, view in zip(slots, views):
            s.param.grad = view if self._zero_copy else None
        try:
            yield
        finally:
            self._task = None
            if not self._zero_copy:
                for i, (s, view) in enumerate(zip(slots, views)):
                    grad = s.param.grad
                    if grad is not None:
                        view.add_(local_tensor(grad.detach()).reshape(view.shape))
                        self._touched[i] = True
            for s in slots:
                s.param.grad = None

    def _reset(self) -> None:
        self.buffer.zero_()
        self._touched = [False] * len(self._touched)
        self._windows = []
        self._stale = False

    def zero_grad(self) -> None:
        """Forget every captured gradient and set ``p.grad = None`` for the partition's parameters."""
        if self._task is not None:
            raise MGSInputError("zero_grad() inside a capture window")
        self._reset()
        for s in self.partition.slots:
            s.param.grad = None

    # ------------------------------------------------------------------ resolve
    def _order_table(self) -> torch.Tensor:
        if self._static_order is not None:
            return self._static_order
        table = random_order(self.partition.num_modules, self.num_tasks, generator=self._generator)
        if self.device.type == "cuda":
            table = table.pin_memory()
        return table.to(self.device, non_blocking=True)

    def _solve(self) -> SurgeryStats:
        """Stages 1-2: (all-reduced) Gram matrices and PCGrad weights, as a stats object."""
        if self._task is not None:
            raise MGSInputError("resolve() / step() inside a capture window")
        self.dist.verify(self._windows, self._table_signature, self.device)
        gram = self.dist.reduce_gram(self._backend.segmented_gram(self.buffer, self.partition.plan))
        order = self._order_table()
        weights = self._backend.pcgrad_weights(gram, order, self.eps)
        plain = self._plain_sum_mask(gram)
        weights = torch.where(plain.unsqueeze(1), torch.ones_like(weights), weights)
        part = self.partition
        return SurgeryStats(gram, weights, part.names, part.kinds, plain, order=order, eps=self.eps,
                            module_layers=part.layers)

    def _plain_sum_mask(self, gram: torch.Tensor) -> torch.Tensor:
        """bool [M]: modules that get the plain sum (excluded, or outside this step's top_k)."""
        mask = self._excluded
        M = gram.shape[0]
        if self.top_k is not None and self.top_k < M:
            plain_norm_sq = gram.sum(dim=(1, 2)).masked_fill(self._excluded, float("-inf"))
            keep = torch.zeros(M, dtype=torch.bool, device=gram.device)
            keep[torch.topk(plain_norm_sq, self.top_k).indices] = True
            mask = mask | ~keep
        return mask

    def _write_grads(self, weights: torch.Tensor) -> None:
        """Stage 3: combine into the result buffer and point every touched ``p.grad`` at it."""
        self._backend.segmented_combine(self.buffer, self.partition.plan, weights, self._result_buffer())
        self._point_grads_at_out()

    def _result_buffer(self) -> torch.Tensor:
        """The [N] buffer the combined gradient lands in (allocated once; p.grad are views of it)."""
        if self._out is None:
            self._out = torch.empty(self.partition.numel, dtype=self.dtype, device=self.device)
        return self._out

    def _point_grads_at_out(self) -> None:
        if self._out_views is None:
            # The result buffer is persistent, so its per-parameter views (DTensor-wrapped for FSDP2)
            # are built once; only parameters of another dtype than the buffer need a fresh cast.
            views = []
            for s in self.partition.slots:
                view = self._out[s.start : s.end].view(s.shape)
                if view.dtype == s.param.dtype and is_dtensor(s.param):
                    view = _like_dtensor(view, s.param)
                views.append(view)
            self._out_views = views
        for s, touched, view in zip(self.partition.slots, self._touched, self._out_views):
            if not touched:
                s.param.grad = None
            elif view.dtype == s.param.dtype:
                s.param.grad = view
            else:
                cast = view.to(s.param.dtype)
                s.param.grad = _like_dtensor(cast, s.param) if is_dtensor(s.param) else cast
        self._stale = True

    def resolve(self) -> SurgeryStats:
        """Combine the captured task gradients with modular PCGrad into ``p.grad``.

        Parameters that got a gradient from no task keep ``grad = None``. Returns the step's stats.
        """
        stats = self._solve()
        self._write_grads(stats.weights)
        return stats

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: Optional[float] = None,
        *,
        error_if_nonfinite: bool = False,
        scaler=None,
        keep_grads: bool = False,
    ) -> SurgeryStats:
        """Resolve, clip and apply ``optimizer``'s update: what ``resolve()``,
        ``clip_grad_norm_(params, max_grad_norm)`` and ``optimizer.step()`` do, with the clipping
        folded into the combine.

        The global gradient norm comes from the Gram matrices and weights (|w_m^T V_m|^2 = w_m^T G_m w_m,
        summed over modules, and over ranks under FSDP2 through the all-reduced Gram), so the clip
        coefficient ``min(1, max_grad_norm / (norm + 1e-6))`` is known before the combine pass and is
        applied to the weights. Backends with a fused optimizer kernel (see README) then update
        parameters and optimizer state in one pass over the task rows; otherwise the combined, clipped
        gradient is written to ``p.grad`` and ``optimizer.step()`` runs. The optimizer's own state
        tensors are updated either way, so ``optimizer.state_dict()`` keeps torch's format.

        Args:
            optimizer: any torch optimizer over (a superset of) the surgery's parameters.
            max_grad_norm: clip the combined gradient to this global L2 norm (None: no clipping).
            error_if_nonfinite: raise (like ``clip_grad_norm_``) when the norm is NaN/Inf; otherwise a
                non-finite norm propagates into the update, as with torch.
            scaler: a ``torch.amp.GradScaler``: then the unfused path runs (resolve, ``unscale_``, clip,
                ``scaler.step``) so the scaler's inf checks and skipped steps behave exactly as usual.
            keep_grads: leave the clipped combined gradient in ``p.grad`` after the step (for logging);
                by default ``p.grad`` is None afterwards.

        Returns:
            SurgeryStats with ``grad_norm`` (the norm before clipping) and ``clip_coef``.
        """
        if max_grad_norm is not None and not float(max_grad_norm) > 0:
            raise MGSInputError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        params = [s.param for s in self.partition.slots]
        if scaler is not None:
            stats = self.resolve()
            scaler.unscale_(optimizer)
            if max_grad_norm is not None:
                stats.clip_coef = None
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm, error_if_nonfinite=error_if_nonfinite)
            scaler.step(optimizer)
            if not keep_grads:
                for p in params:
                    p.grad = None
            return stats
        stats = self._solve()
        weights = stats.weights
        stats.clip_coef = None
        if max_grad_norm is not None:
            total = stats.grad_norm
            if error_if_nonfinite and not bool(torch.isfinite(total)):
                raise RuntimeError(
                    "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot "
                    "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
                    "set `error_if_nonfinite=False`"
                )
            stats.clip_coef = torch.clamp(float(max_grad_norm) / (total + 1e-6), max=1.0)
            weights = weights * stats.clip_coef
        if _fused_step.try_step(self, optimizer, weights, keep_grads):
            self._stale = True
            return stats
        self._write_grads(weights)
        optimizer.step()
        if not keep_grads:
            for p in params:
                p.grad = None
        return stats

    def backward(self, losses: Union[Sequence[torch.Tensor], torch.Tensor]) -> SurgeryStats:
        """One scalar loss per task: backpropagate each into its task's gradient, then ``resolve()``.

        The losses may share one forward graph (it is retained until the last task).
        """
        if isinstance(losses, torch.Tensor):
            if losses.dim() != 1:
                raise MGSInputError(f"losses must be a sequence of T scalars or a 1-D tensor [T], got shape {tuple(losses.shape)}")
            losses = list(losses.unbind(0))
        losses = list(losses)
        if len(losses) != self.num_tasks:
            raise MGSInputError(f"got {len(losses)} losses but num_tasks is {self.num_tasks}")
        for t, loss in enumerate(losses):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise MGSInputError(f"loss of task {t} must be a scalar tensor, got {type(loss).__name__}"
                                    f"{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
            if not loss.requires_grad:
                raise MGSInputError(f"loss of task {t} does not require grad (no path to any parameter)")
        self.zero_grad()
        for t, loss in enumerate(losses):
            with self.capture(t):
                loss.backward(retain_graph=t < len(losses) - 1)
        return self.resolve()

    def remove(self) -> None:
        """Detach the gradient hooks from the model's parameters."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def backend_name(self) -> str:
        """The backend this surgery runs on ("torch", "cpu", "cuda" or "triton"; "auto" resolved)."""
        return getattr(self._backend, "__name__", "").rsplit(".", 1)[-1].replace("_backend", "")

    @property
    def capturing(self) -> Optional[int]:
        """The task whose capture window is open, or None outside any window."""
        return self._task

    @property
    def resolved(self) -> bool:
        """True between a ``resolve()`` / ``step()`` and the next capture (``p.grad`` holds the result)."""
        return self._stale

    @property
    def module_names(self) -> List[str]:
        return self.partition.names


def _like_dtensor(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap a local shard as a DTensor with ``param``'s mesh, placements and global shape."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
