"""``MGSGRPOTrainer``: TRL's ``GRPOTrainer`` with Modular Gradient Surgery.

    trainer = MGSGRPOTrainer(model=model, reward_funcs=[reward], args=GRPOConfig(...), train_dataset=ds,
                             processing_class=tok, num_tasks=3, task_column="task", partition="module")

How the task id travels (trl 1.x): the dataset row reaches ``_generate_and_score_completions(inputs)`` as
a dict (extra columns are also passed to reward functions as keyword arguments). We append
``mgs_task`` ([B] int64, one per completion, aligned with ``prompt_ids`` / ``advantages``) to its output;
``_prepare_inputs`` shuffles and splits that dict into micro-batches along dim 0, so every micro-batch
carries its rows' task ids into ``compute_loss``. From there it is ``MGSTrainerMixin``: the policy forward is
cut at ``lm_head``, trl's own loss (any ``loss_type``, KL, entropy bonus, importance sampling) is
backpropagated once to the cut, then one ``surgery.capture(task)`` backward per task; ``resolve()`` runs at
the end of the last micro-batch's ``training_step``, before the Trainer clips and steps. Diagnostics are
added to the train logs (trl's ``log`` override merges its own metrics into the same dict).
"""

from __future__ import annotations


try:
    import trl
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("mgs_kernels.integrations.MGSGRPOTrainer needs trl: pip install trl") from exc

from .._errors import MGSInputError
from ._split import to_task_ids
from .hf import MGSTrainerMixin

TASK_KEY = "mgs_task"


class MGSGRPOTrainer(MGSTrainerMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose optimizer steps on the modular PCGrad of true per-task policy gradients.

    Extra keyword arguments: see ``mgs_kernels.integrations.MGSTrainerMixin``.
    """

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        col = self.mgs_task_column
        if self.mgs_enabled and all(col in x for x in inputs):
            ids = to_task_ids([x[col] for x in inputs], self.mgs_task_names, self.mgs_num_tasks)
            rows = output["prompt_ids"].shape[0]
            if ids.numel() != rows:
                raise MGSInputError(f"{ids.numel()} task ids for {rows} completions")
            output[TASK_KEY] = ids.to(output["prompt_ids"].device)
        return output

    def _mgs_rows(self, inputs):
        if TASK_KEY in inputs:
            return to_task_ids(inputs.pop(TASK_KEY), None, self.mgs_num_tasks)
        return super()._mgs_rows(inputs)

    def training_step(self, model, inputs, *args, **kwargs):
        # ``inputs`` here is the raw generation batch (a list of rows); trl's _prepare_inputs (inside the base
        # training_step) generates, scores and slices it, and compute_loss sees the micro-batch.
        if not self.mgs_enabled:
            return trl.GRPOTrainer.training_step(self, model, inputs, *args, **kwargs)
        return super().training_step(model, inputs, *args, **kwargs)
