"""HoloV benchmark (issue 4): the official-style loop against the backends.

Baseline ``reference_loop`` (:func:`vtprune.reference.holov_reference_loop`: Python loops
over images and crops, as the official ``HoloV()`` runs). Every provider is checked against
the torch backend with ``sorted=False`` (crops in order, descending attention inside a
crop); outputs that differ only where attention values tie (16-bit attention has many ties)
count as the same.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

import vtprune
from vtprune import reference

from .runner import OpBench, Provider, distinct_valid_picks, kernel_providers
from .shapes import Shape

SHAPES = {
    "llava15-k64": Shape("llava15", 1, 576, 4096, 64),
    "llava15-k128": Shape("llava15", 1, 576, 4096, 128),
    "llava15-k192": Shape("llava15", 1, 576, 4096, 192),
    "llavanext-crops": Shape("llavanext", 5, 576, 4096, 32),
    "serving-b32": Shape("serving", 32, 576, 4096, 64),
    "n2880-k320": Shape("n2880", 1, 2880, 4096, 320),
    "quick-n97-k8": Shape("quick", 1, 97, 128, 8),
    "quick-n97-k16": Shape("quick", 1, 97, 128, 16),
    "quick-n193-k16": Shape("quick", 1, 193, 128, 16),
}
CPU_SHAPES = ("llava15-k64", "llava15-k128", "llava15-k192", "llavanext-crops", "serving-b32", "n2880-k320")
QUICK_SHAPES = ("quick-n97-k8", "quick-n97-k16", "quick-n193-k16")
PROVIDERS = ("reference_loop", "reference", "torch", "triton", "cuda")


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> SimpleNamespace:
    g = torch.Generator(device="cpu").manual_seed(shape.n * 37 + shape.k)
    x = torch.randn(shape.b, shape.n, shape.d, generator=g).to(device=device, dtype=dtype)
    attn = torch.softmax(torch.randn(shape.b, shape.n, generator=g), dim=-1).to(device=device, dtype=dtype)
    return SimpleNamespace(x=x, attn=attn, k=shape.k, crops=reference.default_num_crops(shape.n, shape.k))


def _select(backend: str):
    return lambda i: vtprune.holov_select(i.x, i.attn, i.k, sorted=False, backend=backend)


def check(inputs: SimpleNamespace) -> Tensor:
    return _select("torch")(inputs)


def agrees(out: Tensor, truth: Tensor, inputs: SimpleNamespace) -> bool:
    """Equal, or different only between tokens of equal attention in the same crop."""
    out = out.to(truth.device)
    if torch.equal(out, truth):
        return True
    n = inputs.attn.shape[1]
    if not distinct_valid_picks(out, truth, n):
        return False
    sizes = torch.tensor(reference.crop_sizes_for(n, inputs.crops), device=truth.device)
    crop_of = torch.repeat_interleave(torch.arange(inputs.crops, device=truth.device), sizes)
    attn = inputs.attn.to(truth.device)
    return bool(torch.equal(crop_of[out], crop_of[truth]) and torch.equal(attn.gather(1, out), attn.gather(1, truth)))


def providers(device: torch.device, dtype: torch.dtype) -> dict[str, Provider | str]:
    """Every HoloV provider: a :class:`Provider`, or why it cannot run for tensors on ``device``."""
    out: dict[str, Provider | str] = {
        "reference_loop": Provider(
            "reference_loop", lambda i: reference.holov_reference_loop(i.x, i.attn, i.crops, i.k)
        ),
        "reference": Provider("reference", _select("reference")),
        "torch": Provider("torch", _select("torch")),
    }
    out.update(kernel_providers("holov_select", device, _select))
    return out


BENCH = OpBench(
    name="holov",
    baseline="reference_loop",
    check="picks (sorted=False order) equal the torch backend's, up to ties in attention",
    shapes=SHAPES,
    cpu_shapes=CPU_SHAPES,
    quick_shapes=QUICK_SHAPES,
    provider_names=PROVIDERS,
    make_inputs=make_inputs,
    reference=check,
    agrees=agrees,
    providers=providers,
)
