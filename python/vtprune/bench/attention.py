"""ALVTS attention-importance benchmark (issue 5): materialized attention against the kernels.

The op is :func:`vtprune.attention_importance`: the mean softmax attention each visual key
receives from the visual queries and from the text queries (ALVTS's ``S_v2v`` and
``S_t2v``). Two modes:

* low-rank (ALVTS's selector): one head of width ``R`` (128 or 256), scaled by
  ``1 / sqrt(128)`` (the LLM's head width, SPEC §3);
* exact (FastV-style attention received): ``H = 32`` heads of width 128, and the same with
  grouped-query attention (8 key heads).

Sequences: 35 system tokens, then ``L - 64`` visual tokens, then 29 text tokens (576 visual
tokens at offset 35 for ``L = 640``, LLaVA-1.5's layout); causal, as in the LLM.

Baseline ``materialized``: the whole ``[B, H, L, L]`` attention as an eager attention layer
returns it (logits in the input dtype, softmax in float32 cast back), averaged over heads,
then the per-group column means; it is what a FastV-style method computes. Providers are
checked against the torch backend within a tolerance (below), and a provider that runs out
of GPU memory gets an ``OOM`` row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

import vtprune

from .runner import OpBench, Provider, kernel_providers

#: Tokens before the image and after it (LLaVA-1.5's prompt layout at L = 640).
PREFIX, SUFFIX = 35, 29
#: The LLM's head width: the low-rank logits are scaled by 1 / sqrt(HEAD_DIM) (SPEC §3).
HEAD_DIM = 128


@dataclass(frozen=True)
class AttentionShape:
    """``B`` sequences of ``L`` tokens, ``heads`` query heads (``kv_heads`` key heads) of width ``d``."""

    name: str
    b: int
    l: int  # noqa: E741 - the sequence length is L throughout SPEC §3
    heads: int
    kv_heads: int
    d: int
    prefix: int = PREFIX
    suffix: int = SUFFIX
    gpu_only: bool = False

    @property
    def n_visual(self) -> int:
        return self.l - self.prefix - self.suffix

    @property
    def mode(self) -> str:
        if self.heads == 1:
            return f"lowrank R={self.d}"
        return f"exact H={self.heads}" + (f"/{self.kv_heads}" if self.kv_heads != self.heads else "") + f" d={self.d}"

    def label(self) -> str:
        return f"{self.name} B={self.b} L={self.l} {self.mode}"

    def params(self) -> dict[str, int]:
        return {"B": self.b, "L": self.l, "H": self.heads, "Hkv": self.kv_heads, "d": self.d, "N": self.n_visual}


def _shapes() -> dict[str, AttentionShape]:
    shapes: dict[str, AttentionShape] = {}
    for length in (640, 2944, 8192, 32768):
        for r in (128, 256):
            shapes[f"lowrank-r{r}-L{length}"] = AttentionShape(f"lowrank-r{r}", 1, length, 1, 1, r)
        shapes[f"exact-L{length}"] = AttentionShape("exact", 1, length, 32, 32, 128)
        shapes[f"exact-gqa-L{length}"] = AttentionShape("exact-gqa", 1, length, 32, 8, 128)
    for length in (96, 192):
        shapes[f"quick-lowrank-L{length}"] = AttentionShape("quick-lowrank", 1, length, 1, 1, 32, 5, 11)
    shapes["quick-exact-L96"] = AttentionShape("quick-exact", 1, 96, 4, 2, 32, 5, 11)
    return shapes


SHAPES = _shapes()
CPU_SHAPES = ("lowrank-r128-L640", "lowrank-r256-L640", "exact-L640", "exact-gqa-L640",
              "lowrank-r128-L2944", "lowrank-r256-L2944")
QUICK_SHAPES = ("quick-lowrank-L96", "quick-lowrank-L192", "quick-exact-L96")
PROVIDERS = ("materialized", "torch", "triton", "cuda")


def make_inputs(shape: AttentionShape, device: torch.device, dtype: torch.dtype) -> SimpleNamespace:
    g = torch.Generator(device="cpu").manual_seed(shape.l * 41 + shape.heads * 7 + shape.d)
    q = torch.randn(shape.b, shape.heads, shape.l, shape.d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(shape.b, shape.kv_heads, shape.l, shape.d, generator=g).to(device=device, dtype=dtype)
    groups = torch.ones(shape.b, shape.l, dtype=torch.int64)
    groups[:, shape.prefix : shape.prefix + shape.n_visual] = 0  # group 0: visual queries, 1: text
    scale = (HEAD_DIM if shape.heads == 1 else shape.d) ** -0.5
    return SimpleNamespace(q=q, k=k, groups=groups.to(device), scale=scale,
                           keys=(shape.prefix, shape.prefix + shape.n_visual))


def materialized_attention_importance(
    q: Tensor, k: Tensor, groups: Tensor, num_groups: int, causal: bool, scale: float, key_start: int, key_end: int,
) -> Tensor:
    """Attention importance the FastV way: the full ``[B, H, L, L]`` attention, then column means.

    The attention is what an eager attention layer returns with ``output_attentions``: logits
    in the input dtype (key heads repeated for grouped-query attention), the causal mask, a
    float32 softmax cast back to the input dtype. Then the mean over heads and, per query
    group, the mean over its queries, at keys ``[key_start, key_end)``; ``[B, G, keys]`` float32.
    """
    hq, hk, length = q.shape[1], k.shape[1], q.shape[2]
    if hk != hq:
        k = k.repeat_interleave(hq // hk, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        logits.masked_fill_(torch.ones(length, length, dtype=torch.bool, device=q.device).triu_(1), -math.inf)
    attn = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    del logits
    attn = attn.mean(dim=1)[..., key_start:key_end]  # [B, L(query), keys]
    onehot = (groups[..., None] == torch.arange(num_groups, device=q.device)).to(attn.dtype)  # [B, L, G]
    sums = (onehot.mT @ attn).float()
    counts = onehot.float().sum(dim=1)[..., None]
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))


def _importance(backend: str):
    return lambda i: vtprune.attention_importance(
        i.q, i.k, i.groups, num_groups=2, causal=True, scale=i.scale, key_range=i.keys, backend=backend
    )


def check(inputs: SimpleNamespace) -> Tensor:
    return _importance("torch")(inputs)


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the check: float32 math everywhere for fp32 inputs; for 16-bit
    inputs the materialized baseline rounds logits and probabilities to 16 bits."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def agrees(out: Tensor, truth: Tensor, inputs: SimpleNamespace) -> bool:
    tol = tolerance(inputs.q.dtype)
    out = out.to(device=truth.device, dtype=truth.dtype)
    scale = float(truth.abs().max()) if truth.numel() else 0.0
    return out.shape == truth.shape and bool(torch.allclose(out, truth, rtol=tol, atol=tol * scale))


def providers(device: torch.device, dtype: torch.dtype) -> dict[str, Provider | str]:
    """Every attention-importance provider: a :class:`Provider`, or why it cannot run here."""
    out: dict[str, Provider | str] = {
        "materialized": Provider(
            "materialized",
            lambda i: materialized_attention_importance(i.q, i.k, i.groups, 2, True, i.scale, *i.keys),
        ),
        "torch": Provider("torch", _importance("torch")),
    }
    out.update(kernel_providers("attention_importance", device, _importance))
    return out


BENCH = OpBench(
    name="attention",
    baseline="materialized",
    check="allclose to the torch backend, rtol = tol and atol = tol * max|value|, tol 1e-3 (fp32 inputs) or 5e-2 (16-bit)",
    shapes=SHAPES,
    cpu_shapes=CPU_SHAPES,
    quick_shapes=QUICK_SHAPES,
    provider_names=PROVIDERS,
    make_inputs=make_inputs,
    reference=check,
    agrees=agrees,
    providers=providers,
)
