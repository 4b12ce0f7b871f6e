"""Model-level API: capture true per-task gradients into one flat [T, N] buffer, then combine them per
module (modular PCGrad by default, or any Gram-space method) straight into ``param.grad``.

``ModularGradientSurgery`` composes the units of the pipeline:

    Partition (partition.py)        which parameters form a module, where each lives in the flat axis
    TaskCapture (capture.py)        the [T, N] task buffer and the hooks that fill it, window by window
    DistContext (distributed.py)    FSDP2 / DDP: the Gram all-reduce and the alignment check
    Backend (backends/)             segmented Gram and combine kernels, routed by device and task count
    Weighting (weighting/)          Gram -> per-module weights (PCGrad, ...)
    ResultGrads (capture.py)        the [N] result buffer behind every p.grad
    FusedStep (_fused_step.py)      the one-pass combine + optimizer update of ``step()``
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from . import backends
from ._errors import MGSInputError
from ._fused_step import FusedStep
from ._validate import STORAGE_DTYPES, check_eps
from .capture import ResultGrads, TaskCapture
from .distributed import DistContext, unwrap_ddp
from .order import check_order, fixed_order, parse_order
from .partition import ExcludeSpec, PartitionSpec, build_partition
from .stats import SurgeryStats
from .weighting import PCGrad, Weighting, get_weighting


class ModularGradientSurgery:
    """Per-module gradient surgery (modular PCGrad by default) for a model trained on ``num_tasks`` tasks.

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
        method: how each module's task gradients are combined: "pcgrad" (default; ``order``, ``eps`` and
            ``seed`` configure it) or any name of ``mgs_kernels.weighting.methods()`` ("upgrad", "mgda",
            "cagrad", "nash_mtl", ...), or a ``Weighting`` instance. See docs/methods.md.
        method_options: keyword options of ``method`` (e.g. ``{"c": 0.4}`` for cagrad).

    State across steps (the order generator, the step count, a stateful method's per-module state) is
    saved by ``state_dict()`` and restored by ``load_state_dict()``: a resumed run is bitwise identical
    to an uninterrupted one.

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
        method: Any = "pcgrad",
        method_options: Optional[Dict[str, Any]] = None,
    ):
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise MGSInputError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise MGSInputError(f"top_k must be None or an int >= 0, got {top_k!r}")
        eps = check_eps(eps)
        order = parse_order(order)
        self.model = model
        self.num_tasks = num_tasks
        self.top_k = top_k
        inner, ddp_group = unwrap_ddp(model)
        self.partition = build_partition(inner, partition, exclude)
        slots = self.partition.slots
        self.dist = DistContext.detect(inner, ddp_group, [(s.name, s.param) for s in slots], check_alignment)
        self.device = _one_device(slots)
        self.dtype = _buffer_dtype(slots, dtype)
        M, T, N = self.partition.num_modules, num_tasks, self.partition.numel
        self.backend = backends.get_backend(backend, self.device, T, self.dtype)
        self.weighting = _make_weighting(method, method_options, order, eps, M, T, self.device)
        self._method_state = self.weighting.init_state(M, T, self.device) if self.weighting.stateful else None
        # Random draws (PCGrad's order, random weights) come from the CPU from the seed: the same on every
        # device and rank.
        self._generator = torch.Generator().manual_seed(seed)
        self.steps = 0  # resolve() / step() calls so far
        # Zero-copy capture points p.grad at a view of the buffer, which needs p's dtype and a plain
        # tensor; otherwise (other dtype, FSDP2's DTensor grads) gradients are added into the task row
        # when the capture window closes.
        zero_copy = self.dist.kind != "fsdp" and all(s.param.dtype == self.dtype for s in slots)
        self.task_grads = TaskCapture(slots, T, N, self.dtype, self.device, zero_copy)
        self.result = ResultGrads(slots, N, self.dtype, self.device)
        self._fused = FusedStep(slots, self.device)
        self._excluded = torch.tensor(self.partition.excluded, dtype=torch.bool, device=self.device)
        self._any_excluded = any(self.partition.excluded)
        # What every rank must agree on (checked once under torch.distributed); global shapes, so equal
        # on every rank whatever its shards.
        self._table_signature = repr((T, self.partition.names, self.partition.excluded,
                                      [(s.name, tuple(s.param.shape)) for s in slots]))
        self._resolved = False  # set by resolve() / step(): the next capture starts a new step

    # ------------------------------------------------------------------ capture
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
        if self.task_grads.task is not None:
            raise MGSInputError(f"capture({task}) inside capture({self.task_grads.task}): windows cannot nest")
        if self._resolved:
            self.task_grads.reset()
            self._resolved = False
        with self.task_grads.window(task):
            yield

    def zero_grad(self) -> None:
        """Forget every captured gradient and set ``p.grad = None`` for the partition's parameters."""
        if self.task_grads.task is not None:
            raise MGSInputError("zero_grad() inside a capture window")
        self.task_grads.reset()
        self._resolved = False
        self.result.clear_grads()

    # ------------------------------------------------------------------ resolve
    def _solve(self) -> SurgeryStats:
        """Gram matrices (all-reduced across shards) and weights, as a stats object."""
        if self.task_grads.task is not None:
            raise MGSInputError("resolve() / step() inside a capture window")
        self.dist.verify(self.task_grads.windows, self._table_signature, self.device)
        gram = self.dist.reduce_gram(self.backend.segmented_gram(self.task_grads.buffer, self.partition.plan))
        info: Dict[str, torch.Tensor] = {}
        weights = self.weighting(gram, state=self._method_state, generator=self._generator, info=info,
                                 backend=self.backend)
        self.steps += 1
        plain = self._plain_sum_mask(gram)
        if self._any_excluded or (self.top_k is not None and self.top_k < gram.shape[0]):
            weights = torch.where(plain.unsqueeze(1), torch.ones_like(weights), weights)
        part = self.partition
        order = info.pop("order", None)
        return SurgeryStats(gram, weights, part.names, part.kinds, self._excluded, plain_sum=plain,
                            order=order, eps=getattr(self.weighting, "eps", 0.0), module_layers=part.layers,
                            method=self.weighting.name, method_info=info)

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
        """Combine into the result buffer and point every touched ``p.grad`` at it."""
        self.backend.segmented_combine(self.task_grads.buffer, self.partition.plan, weights, self.result.buffer)
        self.result.point_grads(self.task_grads.touched)
        self._resolved = True

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
        kernel = self.backend.fused_step
        grad_out = self.result.buffer if keep_grads else None
        if kernel is not None and self._fused.run(kernel, optimizer, self.task_grads.buffer, weights,
                                                  self.task_grads.touched, grad_out):
            self.result.clear_grads()
            if keep_grads:
                self.result.point_grads(self.task_grads.touched)
            self._resolved = True
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

    # ------------------------------------------------------------------ state across steps
    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to continue bitwise identically: the random generator, the step count
        and the method's per-module state (CPU tensors)."""
        state = {k: v.detach().cpu().clone() for k, v in (self._method_state or {}).items()}
        return {"method": self.weighting.name, "num_modules": self.partition.num_modules,
                "num_tasks": self.num_tasks, "steps": self.steps, "generator": self._generator.get_state(),
                "method_state": state}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore ``state_dict()``; raises MGSInputError (changing nothing) if it belongs to another setup."""
        want = {"method": self.weighting.name, "num_modules": self.partition.num_modules,
                "num_tasks": self.num_tasks}
        for key, value in want.items():
            if state_dict.get(key) != value:
                raise MGSInputError(f"state_dict has {key}={state_dict.get(key)!r} but this surgery has {value!r}")
        saved = state_dict.get("method_state", {})
        mine = self._method_state or {}
        if saved.keys() != mine.keys() or any(saved[k].shape != mine[k].shape for k in mine):
            raise MGSInputError(f"state_dict's method state {sorted(saved)} does not fit method {self.weighting.name!r}")
        self._generator.set_state(state_dict["generator"])
        self.steps = int(state_dict["steps"])
        for k, v in mine.items():
            v.copy_(saved[k])

    def remove(self) -> None:
        """Detach the gradient hooks from the model's parameters."""
        self.task_grads.remove_hooks()

    @property
    def buffer(self) -> torch.Tensor:
        """The [T, N] task-gradient buffer (row t: task t's gradient in the partition's layout)."""
        return self.task_grads.buffer

    @property
    def backend_name(self) -> str:
        """The backend this surgery runs on ("torch", "cpu", "cuda" or "triton"; "auto" resolved)."""
        return self.backend.name

    @property
    def capturing(self) -> Optional[int]:
        """The task whose capture window is open, or None outside any window."""
        return self.task_grads.task

    @property
    def resolved(self) -> bool:
        """True between a ``resolve()`` / ``step()`` and the next capture (``p.grad`` holds the result)."""
        return self._resolved

    @property
    def module_names(self) -> List[str]:
        return self.partition.names


def _one_device(slots) -> torch.device:
    devices = {s.param.device for s in slots}
    if len(devices) != 1:
        raise MGSInputError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
    return devices.pop()


def _buffer_dtype(slots, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The task buffer's dtype: as given, else the parameters' common dtype, else float32."""
    if dtype is None:
        param_dtypes = {s.param.dtype for s in slots}
        dtype = param_dtypes.pop() if len(param_dtypes) == 1 else torch.float32
    if dtype not in STORAGE_DTYPES:
        raise MGSInputError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def _make_weighting(method: Any, options: Optional[Dict[str, Any]], order, eps: float, num_modules: int,
                    num_tasks: int, device: torch.device) -> Weighting:
    """The configured weighting: PCGrad from ``order`` / ``eps``, or ``method`` with ``options``."""
    if isinstance(method, Weighting) or method != "pcgrad":
        if not (isinstance(order, str) and order == "random") or eps != 0.0:
            raise MGSInputError(f"order= and eps= configure method='pcgrad'; pass the options of method {method!r} "
                                "in method_options")
        return get_weighting(method, options)
    if options:
        raise MGSInputError(f"method 'pcgrad' takes its options as arguments (order=, eps=, seed=), got "
                            f"method_options={options!r}")
    return PCGrad(order=_static_order(order, num_modules, num_tasks, device), eps=eps)


def _static_order(order, num_modules: int, num_tasks: int, device: torch.device):
    """The order spec the weighting uses every step: "random" as is; "fixed" or an explicit table as a
    table on ``device``, checked and built once."""
    if isinstance(order, torch.Tensor):
        check_order(order, num_modules, num_tasks, order.device)
        return order.to(device)
    if order == "fixed":
        return fixed_order(num_modules, num_tasks, device=device)
    return order
