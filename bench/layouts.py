"""Gradient-buffer layouts of real models, scaled to fit the machine, and their partitions.

A layout is the ordered list of a decoder's trainable tensors, in ``model.named_parameters()`` order of
the Hugging Face implementation, which is the order ``ModularGradientSurgery`` lays them out in its flat
[T, N] buffer. Partitions turn it into module offset tables [M+1]:

- ``"tensor"``: every tensor its own module (the released MGS code).
- ``"module"``: per layer the attention tensors, the MLP tensors and the two norms form one module each;
  outside the layers, the embedding, the final norm and the lm_head are one module each
  (what ``mgs_kernels.build_partition(model, "module")`` gives for these models).
- ``"global"``: one module (plain PCGrad over the whole model).

``scale`` multiplies every dimension (hidden, intermediate, key/value width, vocabulary) and rounds, so the
tensor count and the relative sizes are kept while N shrinks about as ``scale**2``; ``scaled(name, n)``
finds the scale that gives about ``n`` elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

PARTITIONS = ("tensor", "module", "global")


@dataclass(frozen=True)
class TensorSpec:
    name: str  # Hugging Face parameter name
    shape: Tuple[int, ...]
    module: str  # group key of the "module" partition

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Layout:
    model: str
    scale: float
    tensors: Tuple[TensorSpec, ...]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    def module_sizes(self, partition: str) -> List[int]:
        """Sizes of the modules of ``partition``, in buffer order (groups are contiguous)."""
        if partition == "tensor":
            return [t.numel for t in self.tensors]
        if partition == "global":
            return [self.numel]
        if partition == "module":
            sizes: List[int] = []
            last = None
            for t in self.tensors:
                if t.module != last:
                    sizes.append(0)
                    last = t.module
                sizes[-1] += t.numel
            return sizes
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")

    def offsets(self, partition: str) -> torch.Tensor:
        """int64 CPU tensor [M+1] of module boundaries for ``partition``."""
        sizes = torch.tensor([0] + self.module_sizes(partition), dtype=torch.int64)
        return torch.cumsum(sizes, 0)

    def num_modules(self, partition: str) -> int:
        return len(self.module_sizes(partition))


def _decoder(
    model: str,
    scale: float,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    q_out: int,
    kv_out: int,
    vocab: int,
    qkv_bias: bool,
) -> Layout:
    def d(x: int) -> int:  # the same base dimension always maps to the same scaled one
        return max(1, int(round(x * scale)))

    h, i, q, kv, v = d(hidden), d(intermediate), d(q_out), d(kv_out), d(vocab)
    out: List[TensorSpec] = [TensorSpec("model.embed_tokens.weight", (v, h), "model.embed_tokens")]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        attn, mlp, norm = f"{p}.self_attn", f"{p}.mlp", f"{p}.norm"
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out.append(TensorSpec(f"{attn}.{proj}.weight", (rows, h), attn))
            if qkv_bias:
                out.append(TensorSpec(f"{attn}.{proj}.bias", (rows,), attn))
        out.append(TensorSpec(f"{attn}.o_proj.weight", (h, q), attn))
        out.append(TensorSpec(f"{mlp}.gate_proj.weight", (i, h), mlp))
        out.append(TensorSpec(f"{mlp}.up_proj.weight", (i, h), mlp))
        out.append(TensorSpec(f"{mlp}.down_proj.weight", (h, i), mlp))
        out.append(TensorSpec(f"{p}.input_layernorm.weight", (h,), norm))
        out.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), norm))
    out.append(TensorSpec("model.norm.weight", (h,), "model.norm"))
    out.append(TensorSpec("lm_head.weight", (v, h), "lm_head"))
    return Layout(model, scale, tuple(out))


def llama31_8b(scale: float = 1.0) -> Layout:
    """Llama-3.1-8B: 32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads of 128, vocab 128256,
    untied lm_head: 291 tensors, 8.03e9 elements at scale 1."""
    return _decoder("llama3.1-8b", scale, hidden=4096, intermediate=14336, layers=32, q_out=4096,
                    kv_out=1024, vocab=128256, qkv_bias=False)


def qwen25_7b(scale: float = 1.0) -> Layout:
    """Qwen2.5-7B: 28 layers, hidden 3584, MLP 18944, 28 heads / 4 KV heads of 128, vocab 152064,
    q/k/v biases, untied lm_head: 339 tensors, 7.62e9 elements at scale 1."""
    return _decoder("qwen2.5-7b", scale, hidden=3584, intermediate=18944, layers=28, q_out=3584,
                    kv_out=512, vocab=152064, qkv_bias=True)


def llama31_70b(scale: float = 1.0) -> Layout:
    """Llama-3.1-70B: 80 layers, hidden 8192, MLP 28672, 64 heads / 8 KV heads of 128, vocab 128256,
    untied lm_head: 723 tensors, 7.06e10 elements at scale 1. Used by comm_bytes.py; not in the
    default benchmark grid (it would not fit a single device unscaled anyway)."""
    return _decoder("llama3.1-70b", scale, hidden=8192, intermediate=28672, layers=80, q_out=8192,
                    kv_out=1024, vocab=128256, qkv_bias=False)


# Adding a model layout is one line here.
LAYOUTS: Dict[str, Callable[[float], Layout]] = {
    "llama3.1-8b": llama31_8b,
    "qwen2.5-7b": qwen25_7b,
}


def scaled(model: str, target_numel: float) -> Layout:
    """The layout of ``model`` with the scale whose element count is closest to ``target_numel``
    (never above scale 1: the real model)."""
    make = LAYOUTS[model]
    full = make(1.0)
    if target_numel >= full.numel:
        return full
    lo, hi = 0.0, 1.0
    for _ in range(60):  # numel is non-decreasing in scale: bisect
        mid = (lo + hi) / 2
        if make(mid).numel < target_numel:
            lo = mid
        else:
            hi = mid
    a, b = make(lo), make(hi)
    return a if abs(a.numel - target_numel) <= abs(b.numel - target_numel) else b


if __name__ == "__main__":
    for name in LAYOUTS:
        for n in (None, 4e6):
            lay = LAYOUTS[name](1.0) if n is None else scaled(name, n)
            mods = {p: lay.num_modules(p) for p in PARTITIONS}
            print(f"{name:12s} scale={lay.scale:.4f} tensors={lay.num_tensors} N={lay.numel:.4g} modules={mods}")
