"""Real verl 0.9.1 on CPU, for the tests of the MGS engine (tests/verl/test_verl_engine.py).

Runs as a worker process (one per rank)::

    python tests/verl/verl_cpu.py --rank 0 --world 2 --port 29600 --model DIR --out OUT.json --scenarios a,b

Everything verl is real: ``TrainingWorker`` (verl.workers.engine_workers), its ``train_mini_batch``, verl's
FSDP2 engine and its ``ppo_loss``; the batch is what verl's trainer hands the actor (``DataProto.
to_tensordict`` + ``left_right_2_no_padding``, ``data_source`` as a non-tensor column). What is not verl:

- a CPU platform (``cpu_platform.py``: ``VERL_PLATFORM=cpu``, verl ships none; ``VERL_ENGINE_DEVICE=cuda``
  so the registry finds the FSDP engines), a gloo process group, fp32 mixed precision, sdpa attention, and a
  tiny Llama saved from a config (no download);
- the reference: task t's gradient is plain verl's gradient with every other task's advantages zeroed (the
  PPO loss of a token with advantage 0 is 0 with zero gradient; token counts and normalization unchanged);
  the expected update is the float64 modular PCGrad of those (``mgs_kernels.reference``), clipped like
  verl's ``optimizer_step`` clips. The optimizer's gradient is read in a step pre-hook (after verl's clip).
  lr = 0, so every optimizer step of a multi-step update (epochs, mini-batches) sees the same weights and
  each step is checked on its own.

Each scenario's numbers go to the JSON file; the pytest side asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from functools import partial
from types import SimpleNamespace

import torch
import verl  # noqa: F401  (first: with VERL_USE_EXTERNAL_MODULES=cpu_platform,... verl imports those itself)

import cpu_platform  # noqa: E402,F401  (VERL_PLATFORM=cpu and the platform, if verl did not import it)

TASKS = ["gsm8k", "code", "chat"]
VOCAB, PROMPT, RESP = 64, 4, 6
SEED = 3  # surgery seed


def save_tiny_llama(path: str, seed: int = 0, hidden: int = 16, layers: int = 2) -> None:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


# ------------------------------------------------------------------------------------------- verl objects
def ppo_loss_fn(**actor_options):
    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss

    config = FSDPActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=8, use_dynamic_bsz=True,
                             **actor_options)
    return partial(ppo_loss, config=config)


def make_worker(model_dir: str, vendor: str, strategy: str = "fsdp2", loss_wrapper=None):
    """verl's TrainingWorker for the actor, as ActorRolloutRefWorker.init_model builds it (verl's defaults:
    packed batches, gradient checkpointing, deferred FSDP2 reduction; fp32 on CPU)."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig, TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    if vendor:
        os.environ["VERL_ENGINE_VENDOR"] = vendor
    else:
        os.environ.pop("VERL_ENGINE_VENDOR", None)
    model_config = HFModelConfig(path=model_dir, load_tokenizer=False, override_config={"attn_implementation": "sdpa"})
    engine_config = FSDPEngineConfig(strategy=strategy, use_torch_compile=False,
                                     mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                      "buffer_dtype": "fp32"})
    assert model_config.use_remove_padding and model_config.enable_gradient_checkpointing  # verl's defaults
    assert engine_config.use_no_sync_for_gradient_accumulation and engine_config.use_dynamic_bsz
    engine_config.micro_batch_size_per_gpu = 4
    engine_config.max_token_len_per_gpu = 40
    optim = FSDPOptimizerConfig(lr=0.0, weight_decay=0.0, clip_grad=1e9, total_training_steps=1000)
    worker = TrainingWorker(TrainingWorkerConfig(model_type="language_model", model_config=model_config,
                                                 engine_config=engine_config, optimizer_config=optim,
                                                 checkpoint_config=CheckpointConfig()))
    worker.reset()
    loss_fn = ppo_loss_fn()
    worker.set_loss_fn(loss_wrapper(loss_fn) if loss_wrapper else loss_fn)
    return worker


def make_batch(labels, seed: int, *, micro: int = 4, dynamic: bool = True, packed: bool = True, epochs: int = 1,
               mini_batches: int = 1, shuffle: bool = False, world: int = 1, zero_except=None,
               entropy: bool = False, ref_log_prob: bool = False, prompt: int = PROMPT, resp: int = RESP,
               max_tokens: int = 40):
    """One rank's share of the actor batch, as verl's trainer builds it (ray_trainer._update_actor)."""
    from tensordict import TensorDict
    from tensordict.tensorclass import NonTensorData, NonTensorStack
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    prompts = torch.randint(0, VOCAB, (n, prompt), generator=g)
    responses = torch.randint(0, VOCAB, (n, resp), generator=g)
    prompt_len = torch.randint(1, prompt + 1, (n,), generator=g)  # left padding
    resp_len = torch.randint(1, resp + 1, (n,), generator=g)  # right padding
    prompt_mask = (torch.arange(prompt) >= prompt - prompt_len[:, None]).long()
    response_mask = (torch.arange(resp) < resp_len[:, None]).long()
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    advantages = torch.randn(n, resp, generator=g) * response_mask
    old_log_probs = -4.2 + 0.3 * torch.randn(n, resp, generator=g)
    if zero_except is not None:  # the reference: only this task's tokens carry an advantage
        keep = torch.tensor([label == zero_except for label in labels], dtype=advantages.dtype)
        advantages = advantages * keep[:, None]
    td = TensorDict({"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                     "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": response_mask,
                     "old_log_probs": old_log_probs, "advantages": advantages}, batch_size=[n])
    if ref_log_prob:
        td["ref_log_prob"] = -4.0 + 0.3 * torch.randn(n, resp, generator=g)
    td["data_source"] = NonTensorStack.from_list([NonTensorData(s) for s in labels])  # DataProto.to_tensordict
    tu.assign_non_tensor(td, temperature=1.0)
    td = left_right_2_no_padding(td)
    mini = n * world // mini_batches  # global mini-batch size (verl divides by the dp size)
    tu.assign_non_tensor(td, calculate_entropy=entropy, distillation_use_topk=False, distillation_only=False,
                         global_batch_size=mini, mini_batch_size=mini, epochs=epochs, seed=42,
                         dataloader_kwargs={"shuffle": shuffle}, compute_loss=True, use_dynamic_bsz=dynamic,
                         micro_batch_size_per_gpu=micro, max_token_len_per_gpu=max_tokens,
                         use_remove_padding=packed)
    return td


class GradRecorder:
    """The full (all-gathered) gradient the optimizer sees at every step: float64 [N] in ``layout`` order.

    For the MGS engine (``order_gen`` given) also the order table the surgery drew for the step (the same
    generator, one draw per resolve) and the sum of the captured task rows (1 rank: the whole gradient)."""

    def __init__(self, worker, layout, order_gen=None):
        self.worker, self.layout, self.steps = worker, layout, []
        self.order_gen, self.tables, self.task_sums = order_gen, [], []
        worker.engine.optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        flat = torch.zeros(self.layout.numel, dtype=torch.float64)
        params = dict(self.worker.engine.module.named_parameters())
        for s in self.layout.slots:
            grad = params[s.name].grad
            if grad is not None:
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                flat[s.start:s.end] = grad.detach().double().reshape(-1)
        self.steps.append(flat)
        if self.order_gen is not None:
            import mgs_kernels as mgs

            surgery = self.worker.engine.mgs_surgery
            self.tables.append(mgs.random_order(surgery.partition.num_modules, surgery.num_tasks,
                                                generator=self.order_gen))
            self.task_sums.append(surgery.buffer.double().sum(0))

    def run(self, td):
        """train_mini_batch; returns (per-step gradients, verl's metrics or None on non-collect ranks)."""
        from verl.utils import tensordict_utils as tu

        self.start = len(self.steps)
        out = self.worker.train_mini_batch(td)
        metrics = tu.get(out, "metrics") if out is not None else None
        return self.steps[self.start:], metrics


def full_layout(module):
    """The module partition of the unsharded model (global shapes), in the surgery's order."""
    import mgs_kernels as mgs

    params = [(n, torch.nn.Parameter(torch.empty(p.shape))) for n, p in module.named_parameters() if p.requires_grad]
    return mgs.build_partition(module, "module", params=params)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- scenarios
def _labels(kind: str, n: int, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1000 * rank)
    if kind == "single":
        return ["code"] * n
    picks = [TASKS[i] for i in torch.randint(0, len(TASKS), (n,), generator=g).tolist()]
    for t, name in enumerate(TASKS):  # every task present on this rank
        picks[(t * 5 + rank) % n] = name
    return sorted(picks, key=TASKS.index) if kind == "sorted" else picks


SCENARIOS = {
    # name: labels kind, rows per rank, make_batch options, clip
    "defaults": ("mixed", 16, dict(dynamic=True, epochs=2, mini_batches=2, shuffle=True), None),
    "sorted": ("sorted", 12, dict(dynamic=True), None),
    "micro1": ("mixed", 12, dict(dynamic=False, micro=1), None),
    "micro4": ("mixed", 12, dict(dynamic=False, micro=4), None),
    "micro12": ("mixed", 12, dict(dynamic=False, micro=12), None),
    "padded": ("mixed", 12, dict(dynamic=False, micro=4, packed=False), None),
    "clipped": ("mixed", 12, dict(dynamic=True), 0.05),
    "single": ("single", 12, dict(dynamic=True, epochs=2), None),
    "rank_mixed": ("mixed", 12, dict(dynamic=True, epochs=2), None),
    "rank_micro3": ("mixed", 12, dict(dynamic=False, micro=3, mini_batches=2), None),
}


def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported to the pytest side, which checks type and text
        return f"{type(exc).__name__}: {exc}"
    return None


def run_checks(plain, mgs_worker, mgs_rec, model_dir: str) -> dict:
    """Errors before any optimizer step, forward-only calls untouched, metric names as verl's trainer logs."""
    from verl.trainer.config import CheckpointConfig
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import reduce_metrics
    from verl.utils.py_functional import rename_dict
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    out = {}
    steps = len(mgs_rec.steps)
    labels = _labels("mixed", 8, 0, 5)
    # An unknown data_source label.
    bad = list(labels)
    bad[3] = "poetry"
    out["unknown_label"] = _error_of(lambda: mgs_worker.train_mini_batch(make_batch(bad, 1, dynamic=False)))
    # A loss term that reaches parameters without passing through the model's output.
    params = [p for p in mgs_worker.engine.module.parameters()]

    def stray(loss_fn):
        def wrapped(*args, **kwargs):
            loss, metrics = loss_fn(*args, **kwargs)
            return loss + 0.0 * sum(p.to_local().sum() for p in params), metrics
        return wrapped

    mgs_worker.set_loss_fn(stray(ppo_loss_fn()))
    out["stray_loss"] = _error_of(lambda: mgs_worker.train_mini_batch(make_batch(labels, 1, dynamic=False)))
    mgs_worker.set_loss_fn(ppo_loss_fn())
    out["optimizer_steps_during_errors"] = len(mgs_rec.steps) - steps
    # Backends the engine refuses, and a forward-only FSDP1 engine (reference policy) that stays plain.
    os.environ["VERL_ENGINE_VENDOR"] = "mgs"
    model_config = HFModelConfig(path=model_dir, load_tokenizer=False)

    def new(backend, **engine_options):
        return EngineRegistry.new(model_type="language_model", backend=backend, model_config=model_config,
                                  engine_config=FSDPEngineConfig(**engine_options),
                                  optimizer_config=FSDPOptimizerConfig(lr=0.0), checkpoint_config=CheckpointConfig())

    out["fsdp1_training"] = _error_of(lambda: new("fsdp", strategy="fsdp"))
    out["megatron"] = _error_of(lambda: EngineRegistry.new(
        model_type="language_model", backend="megatron", model_config=model_config,
        engine_config=SimpleNamespace(strategy="megatron", forward_only=False), optimizer_config=None,
        checkpoint_config=None))
    ref = new("fsdp", strategy="fsdp", forward_only=True)
    out["fsdp1_forward_only"] = [type(ref).__name__, ref.mgs_surgery is None]
    # Forward-only calls of the training engine (old log-probs): plain verl's numbers, nothing captured.
    data = make_batch(labels, 2, dynamic=False)
    tu.assign_non_tensor(data, compute_loss=False, infer_micro_batch_size_per_gpu=4)
    logp = [w.infer_batch(data.clone())["log_probs"].values() for w in (plain, mgs_worker)]
    out["infer_rel"] = rel(logp[1].double(), logp[0].double())
    out["infer_pending"] = mgs_worker.engine._mgs.cut.pending
    # Metric names as verl's trainer logs them (rename_dict + reduce_metrics of ray_trainer._update_actor).
    _, metrics = mgs_rec.run(make_batch(labels, 3, dynamic=False))
    out["logged_keys"] = sorted(reduce_metrics(rename_dict(metrics, "actor/")))
    return out


def run_entropy_kl(plain, mgs_worker, mgs_rec, plain_rec, single: bool) -> dict:
    """Entropy bonus + KL loss (terms that do not vanish with the advantage): the per-task split must still
    sum exactly to plain verl's gradient, and a single-task batch must equal plain verl."""
    loss_fn = ppo_loss_fn(entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.1, calculate_entropy=True)
    for w in (plain, mgs_worker):
        w.set_loss_fn(loss_fn)
    labels = _labels("single" if single else "mixed", 12, 0, 9)
    opts = dict(dynamic=True, entropy=True, ref_log_prob=True)
    mgs_steps, _ = mgs_rec.run(make_batch(labels, 4, **opts))
    task_sums = mgs_rec.task_sums[mgs_rec.start:]
    plain_steps, _ = plain_rec.run(make_batch(labels, 4, **opts))
    for w in (plain, mgs_worker):
        w.set_loss_fn(ppo_loss_fn())
    return {"split_sum_rel": [rel(a, b) for a, b in zip(task_sums, plain_steps)],
            "plain_rel": [rel(g, p) for g, p in zip(mgs_steps, plain_steps)]}


def expected_update(grads: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """float64 [N]: the engine's method (MGS_VERL_OPTIONS) applied per module to the task gradients [T, N]."""
    from mgs_kernels import _settings, reference
    from mgs_kernels.weighting import get_weighting

    options = json.loads(_settings.get("MGS_VERL_OPTIONS") or "{}")
    method = options.get("method", "pcgrad")
    if method == "pcgrad":
        return reference.modular_pcgrad(grads, offsets, order=order, dtype=torch.float64)
    weights = get_weighting(method, options.get("method_options"))(reference.gram(grads, offsets), dtype=torch.float64)
    out = torch.zeros(grads.shape[1], dtype=torch.float64)
    bounds = offsets.tolist()
    for m in range(len(bounds) - 1):
        out[bounds[m]:bounds[m + 1]] = weights[m] @ grads[:, bounds[m]:bounds[m + 1]]
    return out


def run_scenarios(rank: int, world: int, model_dir: str, names, out_path: str) -> None:
    plain = make_worker(model_dir, vendor=None)
    engine_cls_plain = type(plain.engine).__name__
    mgs_worker = make_worker(model_dir, vendor="mgs")
    layout = full_layout(mgs_worker.engine.module)
    # The recorder mirrors the surgery's order draws (same seed, one per optimizer step).
    plain_rec = GradRecorder(plain, layout)
    mgs_rec = GradRecorder(mgs_worker, layout, order_gen=torch.Generator().manual_seed(SEED))
    results = {"engine_plain": engine_cls_plain, "engine_mgs": type(mgs_worker.engine).__name__}
    for name in names:
        if name == "checks":
            results[name] = run_checks(plain, mgs_worker, mgs_rec, model_dir)
            continue
        if name in ("entropy_kl", "entropy_kl_single"):
            results[name] = run_entropy_kl(plain, mgs_worker, mgs_rec, plain_rec, name.endswith("single"))
            continue
        kind, rows, opts, clip = SCENARIOS[name]
        seed = 17 + sum(map(ord, name))
        labels = _labels(kind, rows, rank, seed)
        opts = dict(opts, world=world)
        # The reference gradients are unclipped; the MGS update is clipped by verl after resolve().
        mgs_worker.engine.optimizer_config.clip_grad = clip if clip is not None else 1e9
        t0 = time.perf_counter()
        mgs_steps, metrics = mgs_rec.run(make_batch(labels, seed + rank, **opts))
        tables = mgs_rec.tables[mgs_rec.start:]
        t_mgs = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain_steps, _ = plain_rec.run(make_batch(labels, seed + rank, **opts))
        t_plain = time.perf_counter() - t0
        per_task = [plain_rec.run(make_batch(labels, seed + rank, zero_except=task, **opts))[0] for task in TASKS]
        step_errs, naive_errs, plain_errs = [], [], []
        for k, got in enumerate(mgs_steps):
            grads = torch.stack([per_task[t][k] for t in range(len(TASKS))])
            expected = expected_update(grads, layout.offsets, tables[k])
            naive = grads.sum(0)
            if clip is not None:
                expected = expected * min(1.0, clip / (float(expected.norm()) + 1e-6))
                naive = naive * min(1.0, clip / (float(naive.norm()) + 1e-6))
            step_errs.append(rel(got, expected))
            naive_errs.append(rel(naive, expected))  # how far plain verl is from MGS: the test can fail
            plain_errs.append(rel(got, plain_steps[k]))
        results[name] = {
            "method": mgs_worker.engine.mgs_surgery.weighting.name,
            "steps": len(mgs_steps), "plain_steps": len(plain_steps), "rel_err": step_errs,
            "naive_rel": naive_errs, "plain_rel": plain_errs,
            "sum_vs_plain": [rel(sum(per_task[t][k] for t in range(len(TASKS))), plain_steps[k])
                             for k in range(len(plain_steps))],
            "metrics": {k: v for k, v in (metrics or {}).items() if "mgs" in k},
            "time_mgs": t_mgs, "time_plain": t_plain,
        }
    with open(out_path, "w") as f:
        json.dump(results, f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=29600)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True)
    args = parser.parse_args(argv)
    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(args.rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=args.rank, world_size=args.world)
    try:
        run_scenarios(args.rank, args.world, args.model, args.scenarios.split(","), args.out)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
