"""MGSGRPOTrainer runs trl's real GRPOTrainer on CPU (tiny Llama from a config, a character tokenizer built in
code, rule-based rewards, no downloads). The gradient the optimizer sees (torch optimizer step pre-hook) must
equal the float64 modular PCGrad of per-task policy gradients computed independently with plain autograd on
the same micro-batches (loss_type="dapo", beta=0, one iteration per generation: the clipped surrogate's
gradient is -A * grad log p, normalized by the window's completion tokens)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import mgs_kernels as mgs  # noqa: E402
from mgs_kernels import reference  # noqa: E402
from mgs_kernels.integrations import MGSGRPOTrainer  # noqa: E402

try:
    from trl.trainer.utils import add_fused_lm_head
except ImportError:  # older trl: plain logits
    add_fused_lm_head = None

T = 3
CHARS = list("abcdefghij0123456789 +=?")


def char_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tk.decoder = tokenizers.decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                               bos_token="<bos>")
    tok.padding_side = "left"
    return tok


def tiny_policy(tok, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    return transformers.LlamaForCausalLM(cfg).float()


def reward(completions, task, **kwargs):
    """Rule-based, one rule per domain: 0 wants 'a's, 1 wants digits, 2 wants short answers."""
    out = []
    for text, t in zip(completions, task):
        n = max(len(text), 1)
        if t == 0:
            out.append(text.count("a") / n)
        elif t == 1:
            out.append(sum(c.isdigit() for c in text) / n)
        else:
            out.append(1.0 - len(text) / 8)
    return out


def dataset(n=16):
    prompts = ["ab", "1+2=", "say?", "ba", "9+9=", "hi?", "aa", "3+4="]
    return datasets.Dataset.from_list([{"prompt": prompts[i % 8], "task": [0, 1, 2][i % 8 % 3]} for i in range(n)])


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                gradient_accumulation_steps=2, max_steps=2, learning_rate=0.05, beta=0.0, loss_type="dapo",
                max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                data_seed=0, disable_tqdm=True, temperature=1.0,
                bf16=False)  # GRPOConfig defaults to bf16 autocast; compare in fp32
    base.update(kw)
    return trl.GRPOConfig(**base)


class RecordingMGSGRPOTrainer(MGSGRPOTrainer):
    """Only copies each training micro-batch it is given, then runs the trainer unchanged."""

    recorded = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and torch.is_grad_enabled():
            self.recorded.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


def per_task_grads(model0, params, batches, partition, ga, steps_per_generation):
    model = copy.deepcopy(model0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    model.train()
    # trl 1.x scores completions with its fused LM head (log-probs without materialized logits); use it here too.
    if add_fused_lm_head is not None:
        add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    names = dict(model.named_parameters())
    flat = torch.zeros(T, partition.numel, dtype=torch.float64)
    for t in range(T):
        model.zero_grad(set_to_none=True)
        loss = 0.0
        for b in batches:
            ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
            att = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
            K = b["completion_ids"].shape[1]
            labels = ids.masked_fill(att == 0, -100)
            labels[:, :-K] = -100
            if add_fused_lm_head is not None:
                logp = model(input_ids=ids, attention_mask=att, labels=labels, fused_lm_head=True).log_probs[:, -K:]
            else:
                logits = model(input_ids=ids, attention_mask=att).logits[:, -K - 1 : -1].float()
                logp = torch.log_softmax(logits, -1).gather(-1, b["completion_ids"].unsqueeze(-1)).squeeze(-1)
            sel = (b["mgs_task"] == t).float().unsqueeze(1)
            normalizer = b["num_items_in_batch"].clamp(min=1.0) * ga / steps_per_generation
            loss = loss + (-(b["advantages"].unsqueeze(1)) * logp * b["completion_mask"] * sel).sum() / normalizer
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        for s in partition.slots:
            g = names[s.name].grad
            if g is not None:
                flat[t, s.start : s.end] = g.double().reshape(-1)
    return flat


def test_grpo_optimizer_sees_modular_pcgrad(tmp_path):
    tok = char_tokenizer()
    model = tiny_policy(tok)
    model0 = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    steps = []
    recorded = []

    def pre_step(optimizer, args, kwargs):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
        steps.append((params, grads, list(recorded)))
        recorded.clear()

    opt.register_step_pre_hook(pre_step)
    seed = 3
    RecordingMGSGRPOTrainer.recorded = recorded
    trainer = RecordingMGSGRPOTrainer(model=model, reward_funcs=[reward], args=config(tmp_path), train_dataset=dataset(),
                                      processing_class=tok, optimizers=(opt, None), num_tasks=T, task_column="task",
                                      partition="module", seed=seed)
    trainer.train()
    assert len(steps) == 2
    part = mgs.build_partition(model, "module")
    gen = torch.Generator().manual_seed(seed)
    surgery_visible = False
    for params, grads, batches in steps:
        assert len(batches) == 2
        assert all("mgs_task" in b for b in batches)
        order = mgs.random_order(part.num_modules, T, generator=gen)
        flat = per_task_grads(model0, params, batches, part, ga=2, steps_per_generation=2)
        expected = reference.modular_pcgrad(flat, part.offsets, order=order, dtype=torch.float64)
        got = torch.zeros(part.numel, dtype=torch.float64)
        for s in part.slots:
            if grads[s.name] is not None:
                got[s.start : s.end] = grads[s.name].double().reshape(-1)
        scale = expected.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)
        surgery_visible |= bool((expected - flat.sum(0)).abs().max() > 20 * 1e-4 * scale)
    assert surgery_visible, "no conflict in any step: naive mixing would have passed this test"
    assert any(len(set(b["mgs_task"].tolist())) > 1 for _, _, bs in steps for b in bs)
    logs = [h for h in trainer.state.log_history if "mgs/conflict_pair_fraction" in h]
    assert logs and "reward" in logs[0]


def test_grpo_num_tasks_1_is_the_base_trainer(tmp_path):
    tok = char_tokenizer()
    out = []
    for cls in (trl.GRPOTrainer, MGSGRPOTrainer):
        model = tiny_policy(tok, seed=1)
        kw = dict(num_tasks=1, task_column="one") if cls is MGSGRPOTrainer else {}
        ds = dataset().map(lambda r: {"one": 0})
        trainer = cls(model=model, reward_funcs=[reward], args=config(tmp_path, max_grad_norm=1.0), train_dataset=ds,
                      processing_class=tok, **kw)
        trainer.train()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in out[0]:
        torch.testing.assert_close(out[1][n], out[0][n], rtol=1e-6, atol=1e-7, msg=n)
