"""Qwen2.5-VL: attention received in the last vision block, and M-RoPE positions of the kept tokens.

Qwen2.5-VL's vision tower has no CLS token, so the saliency is the attention each token
*receives* in the last vision block: the mean over that block's queries (within each of its
attention segments: whole images for a full-attention block, windows otherwise) and heads,
from :func:`vtprune.attention_importance`, which never builds the ``L x L`` map. Hooks on the
block capture its input, ``cu_seqlens`` and rotary embeddings, and the q/k are recomputed
from the block's own ``norm1``, ``qkv`` and rotary; the tower runs with its own attention
implementation and no ``output_attentions``.

Inside the tower the patches are permuted into window order, four consecutive patches (a
2x2 block) making one merged token; the last block's outputs and scores are mapped back to
the merged tokens' raster order with the inverse of that permutation, and checked against
the tower's own merged output so a change in the permutation cannot go unnoticed.

The kept tokens enter the prompt with the 3-D position ids they had in the full prompt
(``get_rope_index`` on the original ``input_ids``), so the text after an image keeps its
positions too, as the unpruned model has them.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import Tensor

from ...ops import attention_importance
from ._compat import need, require_transformers, unsupported
from .common import FamilyResult, KeptImage, select_rows


def _window_index(visual: Any, grid_thw: Tensor, model: Any) -> Tensor:
    """The tower's patch-block permutation into window order (its ``window_index``)."""
    require_transformers()
    try:  # transformers >= 5.10
        from transformers.vision_utils import get_vision_window_index
    except ImportError:
        method = getattr(visual, "get_window_index", None)  # earlier releases keep it on the tower
        if not callable(method):
            what = "has neither transformers.vision_utils.get_vision_window_index nor visual.get_window_index"
            raise unsupported(model, what) from None
        return method(grid_thw)[0]
    cfg = visual.config
    return get_vision_window_index(
        grid_thw, spatial_merge_size=cfg.spatial_merge_size, window_size=cfg.window_size, patch_size=cfg.patch_size
    )[0]


def _rotary(model: Any) -> Any:
    module = sys.modules.get(type(model.model.visual).__module__)
    fn = getattr(module, "apply_rotary_pos_emb_vision", None)
    if fn is None:
        raise unsupported(model, "has no apply_rotary_pos_emb_vision in its vision module")
    return fn


def vision_features_and_saliency(
    model: Any, pixel_values: Tensor, image_grid_thw: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per merged token: pre-merger features, merged (projected) features, attention received.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration``.
        pixel_values: the processor's ``[num_patches, C * T * P * P]`` patches.
        image_grid_thw: ``[num_images, 3]``.

    Returns:
        ``(pre [M, 4 * D_vis], merged [M, D_text], received [M])`` for the ``M`` merged
        tokens of all images in order: the last block's output of the 2x2 patches of each
        merged token (concatenated, as the merger reads them), the tower's merged output,
        and the attention the merged token's patches receive in the last block (summed
        over the patches; mean over the queries of their attention segment and the heads; fp32).

    Example::

        pre, merged, received = vision_features_and_saliency(model, inputs["pixel_values"],
                                                              inputs["image_grid_thw"])
    """
    visual = need(model, "model.visual", model)
    blocks = need(visual, "blocks", model)
    merger = need(visual, "merger", model)
    block = blocks[-1]
    norm1, qkv = need(block, "norm1", model), need(block, "attn.qkv", model)
    unit = visual.spatial_merge_size**2
    captured: dict[str, Any] = {}

    def before(module, args, kwargs):
        captured["input"] = args[0] if args else kwargs["hidden_states"]
        captured["cu_seqlens"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        captured["rope"] = kwargs.get("position_embeddings")

    def after_block(module, args, output):
        captured["output"] = output[0] if isinstance(output, (tuple, list)) else output

    def after_merger(module, args, output):
        captured["merged"] = output

    handles = [
        block.register_forward_pre_hook(before, with_kwargs=True),
        block.register_forward_hook(after_block),
        merger.register_forward_hook(after_merger),
    ]
    try:
        pixels = pixel_values.to(device=next(visual.parameters()).device, dtype=visual.dtype)
        out = visual(pixels, grid_thw=image_grid_thw)
    finally:
        for h in handles:
            h.remove()
    merged = getattr(out, "pooler_output", out)
    if not isinstance(merged, Tensor) or "output" not in captured or "merged" not in captured:
        raise unsupported(model, "did not return its merged features from model.visual as expected")
    if captured["rope"] is None or captured["cu_seqlens"] is None:
        raise unsupported(model, "does not pass cu_seqlens and position_embeddings to its vision blocks")

    reverse = torch.argsort(_window_index(visual, image_grid_thw, model).to(merged.device))
    if not torch.equal(captured["merged"][reverse], merged):
        raise unsupported(model, "permutes its vision tokens differently from its window index")

    hidden = captured["input"]
    seq = hidden.shape[0]
    heads = need(block, "attn.num_heads", model)
    scale = getattr(block.attn, "scaling", None) or (hidden.shape[-1] // heads) ** -0.5
    q, k, _ = qkv(norm1(hidden)).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = captured["rope"]
    q, k = _rotary(model)(q, k, cos, sin)
    q, k = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0)  # [1, H, S, d]
    received = torch.empty(seq, dtype=torch.float32, device=hidden.device)
    bounds = captured["cu_seqlens"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            groups = torch.zeros((1, end - start), dtype=torch.int64, device=hidden.device)
            imp = attention_importance(
                q[:, :, start:end], k[:, :, start:end], groups, num_groups=1, causal=False, scale=float(scale)
            )
            received[start:end] = imp[0, 0].float()
    pre = captured["output"].reshape(seq // unit, unit * captured["output"].shape[-1])[reverse]
    received = received.view(seq // unit, unit).sum(dim=1)[reverse]
    return pre, merged, received


def heads_of(model: Any) -> int:
    """Attention heads of the last vision block."""
    return int(need(model, "model.visual.blocks", model)[-1].attn.num_heads)


def _mm_token_type_ids(model: Any, input_ids: Tensor, given: Tensor | None, token: int) -> Tensor:
    if given is not None:
        return given.to(input_ids.device)
    return (input_ids == token).to(torch.int32)


def original_positions(model: Any, input_ids: Tensor, attention_mask: Tensor | None, grid: Tensor, types: Tensor) -> Tensor:
    """``[3, B, L]`` M-RoPE position ids of the unpruned prompt, from the model's ``get_rope_index``."""
    rope_index = need(model, "model.get_rope_index", model)
    params = inspect.signature(rope_index).parameters
    kwargs: dict[str, Any] = {"image_grid_thw": grid, "attention_mask": attention_mask}
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = types
    positions, _ = rope_index(input_ids, **kwargs)
    return positions


def prune_qwen2_5_vl(
    model: Any,
    *,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    processor_outputs: dict,
    method: str,
    keep: int,
    alpha: float | None,
    backend: str,
    options: dict,
) -> FamilyResult:
    """Qwen2.5-VL: ``keep`` of each image's merged tokens, with their original M-RoPE positions."""
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        raise unsupported(model, "has no image_token_id in its config")
    token = int(token)
    pixel_values = processor_outputs.get("pixel_values")
    if pixel_values is None:
        return FamilyResult([], [], token)
    grid = processor_outputs.get("image_grid_thw")
    if not isinstance(grid, Tensor) or grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError("Qwen2.5-VL needs image_grid_thw, a [num_images, 3] tensor from the processor")
    grid = grid.to(input_ids.device)
    unit = model.config.vision_config.spatial_merge_size ** 2
    counts = (grid.prod(-1) // unit).tolist()
    if min(counts) < keep:
        raise ValueError(f"keep must be <= N = {min(counts)} (merged tokens of the smallest image); got {keep}")

    pre, merged, received = vision_features_and_saliency(model, pixel_values, grid)
    num_images, n_max = len(counts), max(counts)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    rows = torch.tensor(
        [[min(s + j, s + c - 1) for j in range(n_max)] for s, c in zip(starts, counts)], device=merged.device
    )  # [images, n_max]; padded slots repeat the last token and are masked by ``lengths``
    lengths = torch.tensor(counts, device=merged.device)
    # SCOPE sums attention over heads (its official code), the others average (scale-free for them)
    saliency = received * heads_of(model) if method == "scope" else received
    measured = {"scope": pre, "holov": merged}.get(method)
    chosen = select_rows(
        method,
        None if measured is None else measured[rows],
        saliency[rows],
        [keep] * num_images,
        alpha=alpha,
        backend=backend,
        options=options,
        lengths=lengths,
    )
    images = [
        KeptImage(features=merged[starts[i] + idx], indices=idx, slots=idx) for i, idx in enumerate(chosen)
    ]
    types = _mm_token_type_ids(model, input_ids, processor_outputs.get("mm_token_type_ids"), token)
    positions = original_positions(model, input_ids, attention_mask, grid, types)
    return FamilyResult(images, counts, token, mrope_positions=positions)
