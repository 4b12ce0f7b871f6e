"""``MGSTrainer``: Hugging Face ``transformers.Trainer`` with Modular Gradient Surgery.

    trainer = MGSTrainer(model=model, args=args, train_dataset=ds,          # ds has a "task" column
                         num_tasks=3, task_column="task", partition="module", seed=0)
    trainer.train()        # logs mgs/conflict_pair_fraction, mgs/cos/0-1, ... with the trainer's own logs

Where it hooks (transformers 5.x ``Trainer._inner_training_loop``): for every micro-batch the loop calls
``training_step`` (forward + ``accelerator.backward``), and after the last micro-batch of an accumulation
window (``accelerator.sync_gradients`` is True) it clips (``_clip_grad_norm``) and steps. So:

- ``compute_loss``: pops the task column (it never reaches the model) and tells the ``TaskSplitter`` the task
  of every row; the loss itself is the base trainer's, unchanged (so is its normalization).
- ``training_step``: runs the base ``training_step``; its single backward stops at the graph cut on the
  output embeddings, then the splitter runs one ``surgery.capture(task)`` backward per task present. On the
  last micro-batch of the window it calls ``surgery.resolve()`` -- before the loop clips and steps (a
  ``TrainerCallback`` would be too late: ``on_pre_optimizer_step`` runs after clipping).
- ``_set_signature_columns_if_needed``: keeps the task column through ``remove_unused_columns``.
- ``log``: adds the averaged ``stats.scalars()`` of the steps since the last log to the train logs.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import torch

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("mgs_kernels.integrations.MGSTrainer needs transformers: pip install transformers accelerate") from exc

from .._errors import MGSInputError
from ..surgery import ModularGradientSurgery
from ._split import StatsAccumulator, TaskSplitter, to_task_ids

# File in each checkpoint folder holding ModularGradientSurgery.state_dict().
MGS_STATE_FILE = "mgs_state.pt"


class MGSTrainerMixin:
    """The MGS part of ``MGSTrainer`` / ``MGSGRPOTrainer``; mix it in before any ``Trainer`` subclass.

    Keyword args (all others go to the base trainer):
        num_tasks: T. With T = 1 the trainer behaves exactly like the base trainer.
        task_column: dataset column holding each example's task id (int in [0, T), or a name in ``task_names``).
        task_names: optional list of T names, for string task columns and log keys.
        partition, order, seed, exclude, backend, eps, dtype, method, method_options:
            ``ModularGradientSurgery`` options (``partition="global"`` is plain PCGrad over the whole model,
            GGS; ``method="upgrad"`` etc. swaps PCGrad for another Gram-space method).
        mgs_enabled: False runs the base trainer untouched (same data pipeline), for A/B runs.
    """

    def __init__(self, *args, num_tasks: int, task_column: str = "task", task_names: Optional[Sequence[str]] = None,
                 partition: Any = "module", order: Any = "random", seed: int = 0, exclude: Any = None,
                 backend: str = "auto", eps: float = 0.0, dtype: Optional[torch.dtype] = None,
                 method: Any = "pcgrad", method_options: Optional[Dict[str, Any]] = None,
                 mgs_enabled: bool = True, **kwargs):
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise MGSInputError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if task_names is not None and len(task_names) != num_tasks:
            raise MGSInputError(f"task_names has {len(task_names)} names but num_tasks is {num_tasks}")
        self.mgs_num_tasks = num_tasks
        self.mgs_task_column = task_column
        self.mgs_task_names = list(task_names) if task_names is not None else None
        self.mgs_enabled = mgs_enabled
        self._mgs_options = dict(partition=partition, order=order, seed=seed, exclude=exclude, backend=backend,
                                 eps=eps, dtype=dtype, method=method, method_options=method_options)
        self.mgs_surgery = None
        self._mgs_resume_state = None  # surgery state read from a checkpoint before the surgery exists
        self.mgs_splitter: Optional[TaskSplitter] = None
        self.mgs_last_stats = None
        self._mgs_log = StatsAccumulator()
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ setup
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.mgs_task_column not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [self.mgs_task_column]

    def _mgs_setup(self, model) -> None:
        if self.mgs_surgery is not None:
            return
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise MGSInputError("MGS needs the per-task gradients in p.grad; DeepSpeed keeps its own gradient "
                                "buffers. Use FSDP2 or DDP.")
        # Build on the model the loop trains (DDP wrapper or FSDP2-sharded), lazily: Trainer wraps it in train().
        # Alignment is checked under DDP too: the trainer's data order is not ours to trust.
        self.mgs_surgery = ModularGradientSurgery(model, num_tasks=self.mgs_num_tasks, check_alignment=True,
                                                  **self._mgs_options)
        if self._mgs_resume_state is not None:
            self.mgs_surgery.load_state_dict(self._mgs_resume_state)
            self._mgs_resume_state = None
        self.mgs_splitter = TaskSplitter(self.mgs_surgery, model)

    # ------------------------------------------------------------------ checkpoints
    # The surgery's state (order generator, step count, a stateful method's per-module state) travels with
    # the optimizer's, so a run resumed with ``resume_from_checkpoint`` continues bitwise identically.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.mgs_surgery is not None and self.args.should_save:
            torch.save(self.mgs_surgery.state_dict(), os.path.join(output_dir, MGS_STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, MGS_STATE_FILE) if checkpoint else None
        if path is None or not os.path.isfile(path) or not self.mgs_enabled:
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if self.mgs_surgery is not None:
            self.mgs_surgery.load_state_dict(state)
        else:
            self._mgs_resume_state = state

    def _mgs_world(self) -> int:
        return int(getattr(self.accelerator, "num_processes", 1) or 1)

    # ------------------------------------------------------------------ per micro-batch
    def _mgs_rows(self, inputs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Pop the task column (the model never sees it) and return the task id of every row."""
        col = self.mgs_task_column
        if col not in inputs:
            if self.mgs_enabled and self.model.training and torch.is_grad_enabled():
                raise MGSInputError(
                    f"the batch has no '{col}' column (keys: {sorted(inputs)}); add the task id of every example "
                    f"to the dataset, and make sure the data collator keeps it"
                )
            return None
        values = inputs.pop(col)
        return to_task_ids(values, self.mgs_task_names, self.mgs_num_tasks)

    def compute_loss(self, model, inputs, *args, **kwargs):
        inputs = dict(inputs)
        rows = self._mgs_rows(inputs)
        if (self.mgs_enabled and rows is not None and self.mgs_splitter is not None and model.training
                and torch.is_grad_enabled()):
            if self._mgs_world() > 1 and rows.unique().numel() > 1:
                raise MGSInputError(
                    "under DDP/FSDP every micro-batch must hold a single task, the same on every rank (the model "
                    "can be backpropagated once per forward, and ranks must capture the same task); group the "
                    "data by task (one task per micro-batch, in the same order on every rank)"
                )
            self.mgs_splitter.set_rows(rows)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        if not self.mgs_enabled:
            inputs = dict(inputs)
            inputs.pop(self.mgs_task_column, None)
            return super().training_step(model, inputs, *args, **kwargs)
        self._mgs_setup(model)
        try:
            loss = super().training_step(model, inputs, *args, **kwargs)
        except BaseException:
            self.mgs_splitter.discard()
            raise
        self.mgs_splitter.flush()
        if self.accelerator.sync_gradients:
            # Last micro-batch of the accumulation window: the loop clips and steps right after we return.
            stats = self.mgs_surgery.resolve()
            self.mgs_last_stats = stats
            self._mgs_log.add(stats)
        return loss

    # ------------------------------------------------------------------ logging
    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs or any(k.startswith("train") for k in logs):
            scalars = self._mgs_log.pop()
            if self.mgs_task_names:
                for t, name in enumerate(self.mgs_task_names):
                    scalars = {k.replace(f"/task{t}/", f"/{name}/"): v for k, v in scalars.items()}
            logs = {**logs, **scalars}
        return super().log(logs, *args, **kwargs)


class MGSTrainer(MGSTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` whose optimizer steps on the modular PCGrad of true per-task gradients.

    Extra keyword arguments: see ``MGSTrainerMixin`` (``num_tasks``, ``task_column``, ``partition``, ``order``,
    ``seed``, ``exclude``, ``backend``, ...).
    """
