"""Input checks shared by the Triton kernel modules.

A kernel module's tensors must be on CUDA, or on the CPU when that module's kernels run under the
Triton interpreter. ``@triton.jit`` chooses between compiling and interpreting when it decorates,
so each module asks its own kernel (``interpreted``) rather than the environment.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs under the Triton interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(x: Tensor, name: str, module: str, interpreting: bool) -> None:
    """Raise ``ValueError`` unless ``x`` is on CUDA, or on the CPU with ``interpreting`` true.

    ``module``: the kernel module's name (``scope``, ``holov``, ...), for the message.
    """
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and interpreting:
        return
    raise ValueError(
        f"the triton backend needs CUDA tensors ({name} is on {x.device}); CPU tensors work only under "
        f"the Triton interpreter, with TRITON_INTERPRET=1 set before vtprune.triton_kernels.{module} is "
        "first imported"
    )


def check_float(x: Tensor, name: str, rank: int, shape_doc: str, module: str, interpreting: bool) -> None:
    """``x`` must be a float32/float16/bfloat16 tensor of ``rank`` dims (``shape_doc`` names them),
    on a device the module's kernels can read (see :func:`check_device`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    check_device(x, name, module, interpreting)
