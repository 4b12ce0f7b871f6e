"""The MGS engine for verl >= 0.9: a subclass of verl's ``FSDPEngineWithLMHead`` (imports verl).

Use ``mgs_kernels.integrations.verl.register_engine``; this module holds the class and the registry plumbing.

Where it hooks into verl 0.9.1's actor update (``TrainingWorker.train_mini_batch`` -> ``train_batch`` ->
``forward_backward_batch`` -> per micro-batch ``forward_step`` + ``loss.backward()`` -> ``optimizer_step``):

- ``forward_step``: reads the task label of every sequence (``task_key``, verl's ``data_source`` column),
  agrees with the other ranks on the tasks of this micro-batch (``union_tasks``), arms the cut at the
  model's output (a task per token when the batch is packed, ``use_remove_padding=True``), runs verl's own
  forward and loss, and checks that the loss reaches the parameters only through the cut.
- ``_gradient_sync_context`` (verl's per-micro-batch context around forward + backward): verl's own
  ``loss.backward()`` now stops at the cut and touches no parameter; on leaving the context, one backward per
  task runs from the cut, each inside ``surgery.capture(task)``. verl's deferred FSDP2 reduction
  (``use_no_sync_for_gradient_accumulation``) would land every task's gradient in the last window, so the
  engine keeps FSDP2's gradient sync ON: every capture window is reduce-scattered when it closes.
- ``optimizer_step``: ``surgery.resolve()`` (modular PCGrad into ``p.grad``) before verl's clip and step.
- ``train_batch``: the step's statistics go into verl's metrics dict as ``mgs/...`` (verl's trainer adds
  ``actor/``), task names instead of indices.

Forward-only engines (reference policy, old log-probs) and forward-only calls are plain verl.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.fsdp import FSDPModule

from verl.utils import tensordict_utils as tu
from verl.workers.engine import EngineRegistry, FSDPEngineWithLMHead
from verl.workers.engine.base import BaseEngine

from .._errors import MGSInputError
from ..surgery import ModularGradientSurgery
from ._output_cut import OutputCut, check_loss_graph, union_tasks

VENDOR = "mgs"
MODEL_TYPE = "language_model"
DEVICES = ["cuda", "npu"]
FSDP_BACKENDS = ["fsdp", "fsdp2"]
# Every other backend verl registers for language models: with VERL_ENGINE_VENDOR=mgs they raise instead of
# silently falling back to their plain engine.
OTHER_BACKENDS = ["megatron", "veomni", "torchtitan", "automodel", "fsdp_turbo"]

_SETTINGS: Dict[str, object] = {}  # task_names, task_key, surgery_options (set by configure())


def configure(task_names: List[str], task_key: str, surgery_options: Dict[str, object]) -> None:
    """Set what every MGS engine built from now on uses, and register the engine classes (once)."""
    if not hasattr(FSDPEngineWithLMHead, "_gradient_sync_context"):  # the per-micro-batch hook (verl 0.9)
        raise MGSInputError(
            "this verl's FSDP engine has no _gradient_sync_context (verl < 0.9?): the MGS engine needs verl >= 0.9 "
            "(tested: 0.9.1); verl <= 0.5 can use MGSActorAdapter (see mgs_kernels.integrations.verl)"
        )
    _SETTINGS.update(task_names=list(task_names), task_key=task_key, surgery_options=dict(surgery_options))
    registry = EngineRegistry._engines
    for backend in FSDP_BACKENDS + OTHER_BACKENDS:
        cls = MGSFSDPEngine if backend in FSDP_BACKENDS else MGSUnsupportedEngine
        for device in DEVICES:
            current = registry.get(MODEL_TYPE, {}).get(backend, {}).get((device, VENDOR))
            if current is cls:
                continue
            if current is not None:
                raise MGSInputError(
                    f"verl's EngineRegistry already holds {current.__name__} for vendor {VENDOR!r} "
                    f"({MODEL_TYPE}, {backend}, {device})"
                )
            EngineRegistry.register(model_type=MODEL_TYPE, backend=backend, device=device, vendor=VENDOR)(cls)


class MGSUnsupportedEngine(BaseEngine):
    """Registered under vendor "mgs" for verl's non-FSDP backends: refuses with a clear error."""

    def __init__(self, model_config=None, engine_config=None, *args, **kwargs):
        strategy = getattr(engine_config, "strategy", None)
        raise MGSInputError(
            f"VERL_ENGINE_VENDOR=mgs selects the MGS engine, which runs on verl's FSDP2 engine only "
            f"(actor_rollout_ref.actor.strategy=fsdp2), not strategy {strategy!r}: Megatron and the other "
            "backends own their gradient buffers (distributed optimizer, pipeline stages), so per-task "
            "gradients cannot be captured there. Unset VERL_ENGINE_VENDOR or switch to fsdp2."
        )


def _labels(micro_batch, key: str) -> List:
    if key not in micro_batch.keys():
        raise MGSInputError(
            f"the micro-batch has no {key!r} column (keys: {sorted(micro_batch.keys())}); register_engine("
            f"task_key=...) names the per-sequence task label (verl's data_source by default)"
        )
    value = tu.get(micro_batch, key)
    batch = micro_batch.batch_size[0]
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    if isinstance(value, (str, int)):  # one label for the whole micro-batch
        return [value] * batch
    return list(value)


class _MGSState:
    """The surgery, the cut and the per-step bookkeeping of one training engine."""

    def __init__(self, engine: "MGSFSDPEngine"):
        names = list(_SETTINGS["task_names"])
        self.task_names = names
        self.task_key = str(_SETTINGS["task_key"])
        self.index = {name: t for t, name in enumerate(names)}
        options = {"partition": "module", **_SETTINGS["surgery_options"]}
        self.surgery = ModularGradientSurgery(engine.module, num_tasks=len(names), **options)
        self.cut = OutputCut(self.surgery, engine.module)
        self.group = engine.get_data_parallel_group()
        self.training = False
        self.tasks: List[int] = []
        self.passes = 0  # per-task backward passes this step
        self.empty_passes = 0  # of which for a task with no token on this rank (rank alignment)
        self.metrics: Dict[str, float] = {}

    def task_ids(self, labels: Sequence) -> Tuple[List[int], Optional[object]]:
        ids, bad = [], None
        for label in labels:
            if isinstance(label, bytes):
                label = label.decode()
            if hasattr(label, "item") and not isinstance(label, str):  # numpy scalars
                label = label.item()
            if isinstance(label, str) and label in self.index:
                ids.append(self.index[label])
            elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(self.task_names):
                ids.append(label)
            else:
                bad = label if bad is None else bad
                ids.append(-1)
        return ids, bad

    def scalars(self, stats) -> Dict[str, float]:
        out = {}
        names = self.task_names
        for key, value in stats.scalars().items():
            parts = key.split("/")
            parts = [names[int(p[4:])] if p.startswith("task") and p[4:].isdigit() else p for p in parts]
            if len(parts) == 3 and parts[1] == "cos":
                i, j = (int(x) for x in parts[2].split("-"))
                parts[2] = f"{names[i]}-{names[j]}"
            out["/".join(parts)] = value
        out["mgs/backward_passes"] = float(self.passes)
        out["mgs/empty_backward_passes"] = float(self.empty_passes)
        return out


class MGSFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP2 LM engine with Modular Gradient Surgery in the actor update (see the module docstring)."""

    def __init__(self, model_config, engine_config, *args, **kwargs):
        trains = not getattr(engine_config, "forward_only", False)
        if trains:
            _check_training_config(model_config, engine_config)
        super().__init__(model_config, engine_config, *args, **kwargs)
        self._mgs_trains = trains
        self._mgs: Optional[_MGSState] = None

    # ------------------------------------------------------------------ per micro-batch
    def _mgs_state(self) -> _MGSState:
        if self._mgs is None:
            self._mgs = _MGSState(self)
        return self._mgs

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        if forward_only or not self._mgs_trains:
            return super().forward_backward_batch(data, loss_function, forward_only=forward_only)
        state = self._mgs_state()
        state.training = True
        try:
            return super().forward_backward_batch(data, loss_function, forward_only=False)
        except BaseException:
            state.cut.discard()
            raise
        finally:
            state.training = False

    def forward_step(self, micro_batch, loss_function, forward_only):
        state = self._mgs
        if forward_only or state is None or not state.training:
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        if state.cut.pending:
            raise RuntimeError(
                "MGS: the previous micro-batch's per-task backward passes did not run; this verl version's "
                "FSDPEngine.forward_backward_batch no longer calls _gradient_sync_context (tested: verl 0.9.1)"
            )
        ids, bad = state.task_ids(_labels(micro_batch, state.task_key))
        # Every rank learns every rank's tasks (and errors) before anything runs, so all raise together and
        # all run the same per-task backward passes (FSDP2's reduce-scatter is collective).
        local = sorted(set(ids) - {-1})
        tasks, any_bad = union_tasks(local, len(state.task_names), state.group, bad is not None,
                                     device=state.surgery.device)
        if any_bad:
            where = f"label {bad!r}" if bad is not None else "an unknown label on another rank"
            raise MGSInputError(
                f"{state.task_key} {where} is not one of the task names {state.task_names} given to "
                "register_engine / MGS_VERL_OPTIONS"
            )
        state.tasks = tasks
        state.passes += len(tasks)
        state.empty_passes += len(tasks) - len(local)
        packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        lengths = micro_batch["input_ids"].offsets().diff() if packed else None
        state.cut.arm(torch.tensor(ids, dtype=torch.int64), lengths)
        try:
            loss, output = super().forward_step(micro_batch, loss_function=loss_function, forward_only=False)
            check_loss_graph(loss, state.cut.leaves)
        except BaseException:
            state.cut.discard()
            raise
        return loss, output

    @contextlib.contextmanager
    def _gradient_sync_context(self, *, is_last_micro_batch: bool):
        state = self._mgs
        if state is None or not state.training:
            with super()._gradient_sync_context(is_last_micro_batch=is_last_micro_batch):
                yield
            return
        # No deferred reduction: verl's backward stops at the cut, and every capture window below must be
        # reduce-scattered when it closes, or its gradient would land in a later window.
        if isinstance(self.module, FSDPModule):
            self.module.set_requires_gradient_sync(True)
        yield
        state.cut.flush(state.tasks)

    # ------------------------------------------------------------------ per step
    def optimizer_zero_grad(self):
        super().optimizer_zero_grad()
        if self._mgs is not None:
            self._mgs.cut.discard()
            self._mgs.surgery.zero_grad()
            self._mgs.passes = self._mgs.empty_passes = 0

    def optimizer_step(self):
        state = self._mgs
        if state is not None:
            stats = state.surgery.resolve()  # modular PCGrad into p.grad, before verl's clip
            state.metrics = state.scalars(stats)
            state.passes = state.empty_passes = 0
        return super().optimizer_step()

    def train_batch(self, data, loss_function):
        outputs = super().train_batch(data, loss_function)
        state = self._mgs
        if state is not None and state.metrics and self.is_mp_src_rank_with_outputs():
            # verl's metrics are lists (one value per micro-batch); it gathers them over ranks and flattens.
            outputs["metrics"].update({k: [v] for k, v in state.metrics.items()})
            state.metrics = {}
        return outputs

    @property
    def mgs_surgery(self) -> Optional[ModularGradientSurgery]:
        """The ``ModularGradientSurgery`` of this training engine (None before the first training batch)."""
        return None if self._mgs is None else self._mgs.surgery


def _check_training_config(model_config, engine_config) -> None:
    """Refuse, before any model is built, the training setups the MGS engine does not handle."""
    strategy = getattr(engine_config, "strategy", None)
    if strategy != "fsdp2":
        raise MGSInputError(
            f"the MGS engine trains with FSDP2 only (actor_rollout_ref.actor.strategy=fsdp2), got strategy "
            f"{strategy!r}: FSDP1 flattens the parameters of each unit into one FlatParameter, so neither "
            "per-module partitions nor per-window gradients exist"
        )
    if getattr(engine_config, "ulysses_sequence_parallel_size", 1) > 1:
        raise MGSInputError("the MGS engine does not support Ulysses sequence parallelism (ulysses_sequence_parallel_size > 1)")
    if getattr(engine_config, "param_offload", False):
        raise MGSInputError("the MGS engine does not support param_offload=True (the task buffer lives on the device)")
