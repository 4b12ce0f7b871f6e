"""MGSTrainer runs the real transformers.Trainer on CPU with a tiny Llama built from a config. The gradient
the optimizer sees (read by a torch optimizer step pre-hook, after the Trainer's own clipping) must equal the
float64 modular PCGrad (mgs_kernels.reference) of per-task gradients computed independently, with plain
autograd, on the micro-batches the model saw."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")

import mgs_kernels as mgs  # noqa: E402
from mgs_kernels import reference  # noqa: E402
from mgs_kernels.integrations import MGSTrainer  # noqa: E402

T = 3
VOCAB = 48
SEQ = 8


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return transformers.LlamaForCausalLM(cfg).float()


def make_dataset(n=16, seed=0):
    """Three synthetic domains (count up / count down / repeat a pair); labels -100 on some positions."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        task = int(torch.randint(0, T, (1,), generator=g))
        start = int(torch.randint(3, VOCAB, (1,), generator=g))
        pos = torch.arange(SEQ)
        if task == 0:
            ids = (start + pos) % (VOCAB - 3) + 3
        elif task == 1:
            ids = (start - 2 * pos) % (VOCAB - 3) + 3
        else:
            ids = torch.tensor([start, (start * 7) % (VOCAB - 3) + 3] * (SEQ // 2))
        labels = ids.clone()
        labels[: 1 + i % 3] = -100  # uneven numbers of target tokens per row
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * SEQ, "labels": labels.tolist(), "task": task})
    return datasets.Dataset.from_list(rows), rows


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                learning_rate=0.05, max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no",
                use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class Recorder:
    """Observes the model (forward pre-hook) and the optimizer (step pre-hook); changes nothing."""

    def __init__(self, model, optimizer):
        self.model = model
        self.batches = []  # micro-batches of the current step (grad-enabled forwards)
        self.steps = []    # per optimizer step: (params before the step, grads the optimizer sees, micro-batches)
        model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        optimizer.register_step_pre_hook(self._on_step)

    def _on_forward(self, module, args, kwargs):
        if torch.is_grad_enabled() and module.training:
            self.batches.append({k: kwargs[k].detach().clone() for k in ("input_ids", "labels", "attention_mask")})

    def _on_step(self, optimizer, args, kwargs):
        params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in self.model.named_parameters()}
        self.steps.append((params, grads, self.batches))
        self.batches = []


def task_of_rows(rows):
    return {tuple(r["input_ids"]) + tuple(r["labels"]): r["task"] for r in rows}


def per_task_grads(model0, params, batches, lookup, partition, normalization):
    """[T, N] float64: gradient of each task's share of the window loss, by plain autograd on a fresh copy."""
    model = copy.deepcopy(model0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    model.train()
    names = dict(model.named_parameters())
    total_items = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    flat = torch.zeros(T, partition.numel, dtype=torch.float64)
    for t in range(T):
        model.zero_grad(set_to_none=True)
        loss = 0.0
        for b in batches:
            tasks = torch.tensor([lookup[tuple(i.tolist()) + tuple(l.tolist())] for i, l in zip(b["input_ids"], b["labels"])])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            shift_logits, shift_labels = logits[:, :-1], b["labels"][:, 1:]
            ce = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, VOCAB), shift_labels.reshape(-1),
                                                   ignore_index=-100, reduction="none").view_as(shift_labels)
            sel = (tasks == t).view(-1, 1).float()
            if normalization == "window_tokens":   # num_items_in_batch: sum / tokens of the whole window
                loss = loss + (ce * sel).sum() / total_items
            else:                                  # per micro-batch token mean, divided by accumulation steps
                loss = loss + (ce * sel).sum() / shift_labels.ne(-100).sum() / len(batches)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        for s in partition.slots:
            g = names[s.name].grad
            if g is not None:
                flat[t, s.start : s.end] = g.double().reshape(-1)
    return flat


def flat_grads(grads, partition):
    out = torch.zeros(partition.numel, dtype=torch.float64)
    for s in partition.slots:
        if grads[s.name] is not None:
            out[s.start : s.end] = grads[s.name].double().reshape(-1)
    return out


@pytest.mark.parametrize("partition,normalization,clip", [
    ("module", "window_tokens", 0.0),
    ("global", "window_tokens", 0.0),
    ("tensor", "micro_batch_mean", 0.0),
    ("module", "window_tokens", 0.05),
])
def test_optimizer_sees_modular_pcgrad_of_per_task_gradients(tmp_path, partition, normalization, clip):
    ds, rows = make_dataset()
    model = tiny_llama()
    model0 = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder(model, opt)
    seed = 5
    trainer = MGSTrainer(model=model, args=args(tmp_path, max_grad_norm=clip), train_dataset=ds,
                         data_collator=transformers.default_data_collator, optimizers=(opt, None),
                         num_tasks=T, task_column="task", partition=partition, seed=seed)
    if normalization == "micro_batch_mean":
        trainer.model_accepts_loss_kwargs = False  # the model's own per-micro-batch mean; Trainer divides by GA
    trainer.train()
    logs = trainer.state.log_history

    assert len(rec.steps) == 3
    part = mgs.build_partition(model, partition)
    gen = torch.Generator().manual_seed(seed)
    lookup = task_of_rows(rows)
    mixed = 0
    for params, grads, batches in rec.steps:
        assert len(batches) == 2  # two micro-batches per step (gradient accumulation)
        for b in batches:
            mixed += len({lookup[tuple(i.tolist()) + tuple(l.tolist())] for i, l in zip(b["input_ids"], b["labels"])}) > 1
        order = mgs.random_order(part.num_modules, T, generator=gen)
        flat = per_task_grads(model0, params, batches, lookup, part, normalization)
        expected = reference.modular_pcgrad(flat, part.offsets, order=order, dtype=torch.float64)
        if clip > 0:
            norm = expected.norm().item()
            expected = expected * min(1.0, clip / (norm + 1e-6))
        got = flat_grads(grads, part)
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4 * expected.abs().max().item())
        naive = flat.sum(0)
        if clip == 0:
            # surgery changed the gradient by far more than the tolerance: naive mixing would fail this test
            assert (expected - naive).abs().max() > 20 * 2e-4 * expected.abs().max(), "too little conflict to test"
    assert mixed > 0, "no micro-batch mixed tasks: the split path was not exercised"
    train_logs = [l for l in logs if "loss" in l]
    assert train_logs and all("mgs/conflict_pair_fraction" in l and "mgs/cos/0-1" in l for l in train_logs)


def test_num_tasks_1_is_the_base_trainer(tmp_path):
    ds, _ = make_dataset()
    results = []
    for cls in (transformers.Trainer, MGSTrainer):
        model = tiny_llama(seed=1)
        kw = dict(num_tasks=1, task_column="task") if cls is MGSTrainer else {}
        ds_in = ds.map(lambda r: {"task": 0}) if cls is MGSTrainer else ds
        trainer = cls(model=model, args=args(tmp_path, max_grad_norm=1.0, max_steps=3), train_dataset=ds_in,
                      data_collator=transformers.default_data_collator, **kw)
        out = trainer.train()
        results.append((out.training_loss, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, pa), (loss_b, pb) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for n in pa:
        torch.testing.assert_close(pb[n], pa[n], rtol=1e-6, atol=1e-7, msg=n)


def test_missing_task_column_is_a_clear_error(tmp_path):
    ds, _ = make_dataset(n=8)
    trainer = MGSTrainer(model=tiny_llama(), args=args(tmp_path, max_steps=1), train_dataset=ds.remove_columns("task"),
                         data_collator=transformers.default_data_collator, num_tasks=T, task_column="task")
    with pytest.raises(ValueError, match="no 'task' column"):
        trainer.train()


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import sys, mgs_kernels, mgs_kernels.integrations; assert 'transformers' not in sys.modules; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


class _StopAt(transformers.TrainerCallback):
    """Interrupt training after ``step`` optimizer steps (after the checkpoint of that step is written)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _resume_run(tmp_path, method, options, *, interrupt, drop_mgs_state=False):
    ds, _ = make_dataset(n=24, seed=3)
    run_args = args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, learning_rate=0.02, max_grad_norm=1.0)
    kw = dict(train_dataset=ds, data_collator=transformers.default_data_collator, num_tasks=T, task_column="task",
              partition="module", seed=11, method=method, method_options=options)
    trainer = MGSTrainer(model=tiny_llama(seed=2), args=run_args,
                         callbacks=[_StopAt(3)] if interrupt else None, **kw)
    trainer.train()
    if interrupt:
        checkpoint = tmp_path / "checkpoint-3"
        assert (checkpoint / "mgs_state.pt").is_file()
        if drop_mgs_state:
            (checkpoint / "mgs_state.pt").unlink()
        trainer = MGSTrainer(model=tiny_llama(seed=2), args=run_args, **kw)  # a fresh process would do this
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer.mgs_surgery.steps


@pytest.mark.parametrize("method,options,state_changes_results", [
    ("pcgrad", None, True),          # the order generator
    ("gradvac", {"beta": 0.5}, True),  # the generator and the per-module EMA targets
    ("nash_mtl", None, False),       # a warm start only: the converged weights do not depend on it
])
def test_resume_from_checkpoint_is_bitwise_identical(tmp_path, method, options, state_changes_results):
    straight, steps = _resume_run(tmp_path / "a", method, options, interrupt=False)
    resumed, resumed_steps = _resume_run(tmp_path / "b", method, options, interrupt=True)
    assert steps == resumed_steps == 6
    for name, p in straight.items():
        assert torch.equal(p, resumed[name]), name
    if state_changes_results:
        # The surgery's own state matters: resuming without it (the generator restarts from the seed, the
        # EMA targets from zero) gives another result, so the equality above is not an accident.
        forgetful, _ = _resume_run(tmp_path / "c", method, options, interrupt=True, drop_mgs_state=True)
        assert any(not torch.equal(p, forgetful[name]) for name, p in straight.items())
