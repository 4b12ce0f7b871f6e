"""Partitions built from real model structures."""

from __future__ import annotations

import pytest
from torch import nn

import mgs_kernels as mgs
from models import tiny_model


def names(model, partition, **kw):
    return mgs.build_partition(model, partition, **kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_llama_family_module_partition(kind):
    model = tiny_model(kind)
    p = names(model, "module")
    expected = ["model.embed_tokens"]
    for i in range(2):
        expected += [f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp", f"model.layers.{i}.norm"]
    expected += ["model.norm", "lm_head"]
    assert p.names == expected
    assert p.kinds == ["embed"] + ["attn", "mlp", "norm"] * 2 + ["norm", "head"]
    # Each layer's norm module holds both of its RMSNorm weights.
    slots = [s.name for s in p.slots if s.module == p.names.index("model.layers.0.norm")]
    assert slots == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]


def test_gpt2_module_partition():
    p = names(tiny_model("gpt2"), "module")
    expected = ["transformer.wte", "transformer.wpe"]
    for i in range(2):
        expected += [f"transformer.h.{i}.norm", f"transformer.h.{i}.attn", f"transformer.h.{i}.mlp"]
    expected += ["transformer.ln_f"]
    assert p.names == expected  # lm_head is tied to wte and counted once
    assert p.kinds[:2] == ["embed", "embed"] and p.kinds[-1] == "norm"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_tensor_layer_global_and_callable(kind):
    model = tiny_model(kind)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensor = names(model, "tensor")
    assert tensor.names == [n for n, _ in params]
    assert tensor.numel == sum(p.numel() for _, p in params)
    layer = names(model, "layer")
    if kind == "gpt2":
        assert layer.names == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                               "transformer.ln_f"]
    else:
        assert layer.names == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert [k for n, k in zip(layer.names, layer.kinds) if n[-1].isdigit()] == ["mixed", "mixed"]
    glob = names(model, "global")
    assert glob.names == ["global"] and glob.offsets.tolist() == [0, tensor.numel]
    by_kind = names(model, lambda n: "bias" if n.endswith("bias") else "weight")
    assert set(by_kind.names) <= {"weight", "bias"}


def test_layout_is_module_contiguous_and_offsets_match_sizes():
    model = tiny_model("qwen2")
    p = names(model, "module")
    off = p.offsets.tolist()
    pos = 0
    for s in p.slots:
        assert s.start == pos and s.end - s.start == s.param.numel()
        assert off[s.module] <= s.start and s.end <= off[s.module + 1]
        pos = s.end
    assert pos == off[-1]


def test_exclude_patterns():
    model = tiny_model("llama")
    p = names(model, "module", exclude=["*.norm"])
    assert [n for n, e in zip(p.names, p.excluded) if e] == [
        "model.layers.0.norm", "model.layers.1.norm", "model.norm"]
    import re
    p = names(model, "tensor", exclude=re.compile(r"mlp\.(up|gate)_proj"))
    assert sum(p.excluded) == 4
    p = names(model, "module", exclude=lambda name: name.endswith("self_attn"))
    assert sum(p.excluded) == 2


def test_plain_modules_and_frozen_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    p = names(model, "module")
    assert p.names == ["0", "2"]
    assert [s.name for s in p.slots] == ["0.weight", "2.weight", "2.bias"]
