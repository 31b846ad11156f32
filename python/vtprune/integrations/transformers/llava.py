"""LLaVA-1.5 and LLaVA-NeXT: CLIP features and CLS attention, per-image and per-crop selection.

The CLS->patch attention SCOPE and HoloV need is one row of one layer's attention. Asking
the tower for ``output_attentions`` would force the eager attention path and build every
layer's ``[B, H, T, T]`` map; instead two hooks on the layer that produced the features
capture its input and output, and the CLS row is recomputed from that layer's own
``layer_norm1``, ``q_proj`` and ``k_proj``: ``softmax(q_cls k^T * scale)``, one ``[B, H, T]``
row, fp32. The tower keeps whatever attention implementation (SDPA, flash) it was loaded with.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from ._compat import need, unsupported
from .common import FamilyResult, KeptImage, select_rows, split_budget


def _encoder_layers(vision_tower: Any) -> Any:
    inner = getattr(vision_tower, "vision_model", vision_tower)
    return need(inner, "encoder.layers", vision_tower)


def feature_layer_index(num_layers: int, feature_layer: int, where: Any) -> int:
    """The encoder layer whose output is ``hidden_states[feature_layer]``.

    ``hidden_states`` has ``num_layers + 1`` entries, entry 0 being the encoder's input, so
    entry ``j`` (negative counts from the end) is the output of layer ``j - 1``.
    """
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise unsupported(where, f"has vision_feature_layer = {feature_layer!r}; pruning needs one int layer")
    count = num_layers + 1
    if not -count <= feature_layer < count:
        raise ValueError(f"vision_feature_layer must lie in [{-count}, {count}); got {feature_layer}")
    j = feature_layer % count
    if j == 0:
        raise ValueError(
            "vision_feature_layer selects the patch embeddings, which no attention layer produced; "
            "there is no CLS attention to prune with"
        )
    return j - 1


def clip_features_and_cls_attention(
    vision_tower: Any, pixel_values: Tensor, feature_layer: int = -2
) -> tuple[Tensor, Tensor]:
    """``hidden_states[feature_layer]`` of a CLIP vision tower and that layer's CLS attention row.

    Args:
        vision_tower: a ``CLIPVisionModel`` (or its ``vision_model``), e.g.
            ``llava.model.vision_tower``.
        pixel_values: ``[B, 3, H, W]`` in the tower's dtype and device.
        feature_layer: index into the tower's hidden states, as LLaVA's
            ``vision_feature_layer`` (-2: the penultimate layer's output).

    Returns:
        ``(features [B, T, D], cls_attention [B, H, T])``: the layer's output tokens (CLS
        first) and, per head, the softmax attention of the CLS query over all ``T`` keys
        (fp32; each row sums to 1). ``cls_attention[:, :, 1:]`` is the CLS->patch attention.

    Example::

        feats, attn = clip_features_and_cls_attention(model.model.vision_tower, pixel_values)
        patches, saliency = feats[:, 1:], attn[:, :, 1:].sum(dim=1)   # SCOPE's inputs
    """
    layers = _encoder_layers(vision_tower)
    index = feature_layer_index(len(layers), feature_layer, vision_tower)
    layer = layers[index]
    norm = need(layer, "layer_norm1", vision_tower)
    attn = need(layer, "self_attn", vision_tower)
    q_proj, k_proj = need(attn, "q_proj", vision_tower), need(attn, "k_proj", vision_tower)
    captured: dict[str, Any] = {}

    def before(module, args, kwargs):
        captured["input"] = args[0] if args else kwargs["hidden_states"]
        captured["mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

    def after(module, args, output):
        captured["output"] = output[0] if isinstance(output, (tuple, list)) else output

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True), layer.register_forward_hook(after)]
    try:
        vision_tower(pixel_values)
    finally:
        for h in handles:
            h.remove()
    if "output" not in captured:
        raise unsupported(vision_tower, f"did not run encoder layer {index} in its forward")
    if captured["mask"] is not None:
        raise unsupported(vision_tower, "passes an attention mask to its encoder layers (CLIP's vision tower has none)")

    hidden = captured["input"]
    batch, tokens, _ = hidden.shape
    heads = getattr(attn, "num_heads", None) or vision_tower.config.num_attention_heads
    head_dim = q_proj.out_features // heads
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or head_dim**-0.5
    x = norm(hidden)
    q = q_proj(x[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2).float()  # [B, H, 1, d]
    k = k_proj(x).view(batch, tokens, heads, head_dim).transpose(1, 2).float()  # [B, H, T, d]
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * float(scale)
    return captured["output"], torch.softmax(logits, dim=-1)


def _check_strategy(model: Any) -> int:
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise unsupported(
            model,
            f"has vision_feature_select_strategy = {strategy!r}; pruning supports 'default' (CLS dropped, "
            "its attention used as saliency)",
        )
    return model.config.vision_feature_layer


def _image_token_id(model: Any) -> int:
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        token = getattr(model.config, "image_token_index", None)
    if token is None:
        raise unsupported(model, "has no image_token_id in its config")
    return int(token)


def _tower_inputs(model: Any, pixel_values: Any) -> tuple[Any, Tensor]:
    tower = need(model, "model.vision_tower", model)
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor; got {type(pixel_values).__name__}")
    ref = next(tower.parameters())
    return tower, pixel_values.to(device=ref.device, dtype=ref.dtype)


def _features_for(method: str, pre: Tensor, projector: Any) -> tuple[Tensor | None, Tensor | None]:
    """(features the method measures, projected features of every token or None)."""
    if method == "scope":
        return pre, None
    if method == "holov":
        post = projector(pre)
        return post, post
    return None, None


def _saliency_for(method: str, cls_attention: Tensor) -> Tensor:
    """CLS->patch attention ``[R, H, N]`` -> ``[R, N]``: summed over heads for SCOPE (the official
    code), averaged for the others (HoloV; top-k is invariant to the scale)."""
    return cls_attention.sum(dim=1) if method == "scope" else cls_attention.mean(dim=1)


def _check_keep_le(keep: int, n: int, what: str) -> None:
    if keep > n:
        raise ValueError(f"keep must be <= N = {n} ({what}); got {keep}")


def prune_llava(
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
    """LLaVA-1.5: one CLIP crop per image, ``keep`` of its ``N`` patch tokens."""
    token = _image_token_id(model)
    pixel_values = processor_outputs.get("pixel_values")
    if pixel_values is None:
        return FamilyResult([], [], token)
    if processor_outputs.get("image_sizes") is not None:
        raise unsupported(model, "was given image_sizes; pruning supports LLaVA-1.5's fixed-size CLIP crops")
    feature_layer = _check_strategy(model)
    tower, pixels = _tower_inputs(model, pixel_values)
    if pixels.dim() != 4:
        raise ValueError(f"pixel_values must be [num_images, 3, H, W] for LLaVA-1.5; got shape {tuple(pixels.shape)}")
    projector = need(model, "model.multi_modal_projector", model)
    feats, cls_attn = clip_features_and_cls_attention(tower, pixels, feature_layer)
    pre = feats[:, 1:]
    num_images, n = pre.shape[:2]
    _check_keep_le(keep, n, "patch tokens per image")
    measured, post = _features_for(method, pre, projector)
    chosen = select_rows(
        method, measured, _saliency_for(method, cls_attn[:, :, 1:]), [keep] * num_images,
        alpha=alpha, backend=backend, options=options,
    )
    images = []
    for i, idx in enumerate(chosen):
        kept = post[i, idx] if post is not None else projector(pre[i, idx])
        images.append(KeptImage(features=kept, indices=idx, slots=idx))
    return FamilyResult(images, [n] * num_images, token)


def _next_helpers(model: Any) -> tuple[Any, Any]:
    """``image_size_to_num_patches`` and ``get_anyres_image_grid_shape`` of the model's module."""
    module = sys.modules.get(type(model.model).__module__)
    fns = tuple(getattr(module, name, None) for name in ("image_size_to_num_patches", "get_anyres_image_grid_shape"))
    if None in fns:
        raise unsupported(model, "has no image_size_to_num_patches/get_anyres_image_grid_shape in its module")
    return fns


def _next_placeholder_counts(model: Any, crops: list[int], tokens_per_crop: int, image_sizes: Tensor) -> list[int]:
    """How many image tokens the unpruned model gives each image (unpadded grid plus newlines),
    from the model's own ``pack_image_features`` on 1-wide dummy features."""
    pack = need(model, "model.pack_image_features", model)
    dummies = [torch.zeros(c, tokens_per_crop, 1) for c in crops]
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    packed, _ = pack(dummies, image_sizes.cpu(), vision_feature_select_strategy=strategy, image_newline=torch.zeros(1))
    return [int(p.shape[0]) for p in packed]


def prune_llava_next(
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
    """LLaVA-NeXT: the base crop and the high-resolution crops of each image, ``keep`` split over them."""
    token = _image_token_id(model)
    pixel_values = processor_outputs.get("pixel_values")
    if pixel_values is None:
        return FamilyResult([], [], token)
    image_sizes = processor_outputs.get("image_sizes")
    if not isinstance(image_sizes, Tensor):
        raise ValueError("LLaVA-NeXT needs image_sizes (a [num_images, 2] tensor from the processor)")
    feature_layer = _check_strategy(model)
    tower, pixels = _tower_inputs(model, pixel_values)
    to_num_crops, grid_shape = _next_helpers(model)
    pinpoints = model.config.image_grid_pinpoints
    crop_size = model.config.vision_config.image_size
    crops = [int(to_num_crops(image_size=s, grid_pinpoints=pinpoints, patch_size=crop_size)) for s in image_sizes]
    if pixels.dim() == 5:
        if pixels.shape[0] != len(crops):
            raise ValueError(f"pixel_values has {pixels.shape[0]} images but image_sizes {len(crops)}")
        pixels = torch.cat([p[:c] for p, c in zip(pixels, crops)])
    elif pixels.dim() != 4 or pixels.shape[0] != sum(crops):
        raise ValueError(
            f"pixel_values must be [num_images, max_crops, 3, H, W] or [{sum(crops)} crops, 3, H, W]; "
            f"got shape {tuple(pixels.shape)}"
        )
    projector = need(model, "model.multi_modal_projector", model)
    feats, cls_attn = clip_features_and_cls_attention(tower, pixels, feature_layer)
    pre = feats[:, 1:]
    n = pre.shape[1]
    side = crop_size // model.config.vision_config.patch_size
    if side * side != n:
        raise unsupported(model, f"gives {n} patch tokens per crop, not the ({crop_size} / patch size)^2 = {side * side}")
    _check_keep_le(keep, min(crops) * n, f"{n} tokens x {min(crops)} crops of the smallest image")
    budgets = [b for c in crops for b in split_budget(keep, c)]
    measured, post = _features_for(method, pre, projector)
    chosen = select_rows(
        method, measured, _saliency_for(method, cls_attn[:, :, 1:]), budgets,
        alpha=alpha, backend=backend, options=options,
    )

    images = []
    first = 0
    for i, c in enumerate(crops):
        rows, cols = (int(v) for v in grid_shape(image_sizes[i], pinpoints, crop_size))
        if rows * cols != c - 1:
            raise unsupported(model, f"gives image {i} {c - 1} high-resolution crops but a {rows}x{cols} grid")
        crop_ids, token_ids, keys = [], [], []
        for local in range(c):
            idx = chosen[first + local]
            crop_ids.append(torch.full_like(idx, first + local))
            token_ids.append(idx)
            if local == 0:  # the base image first, in its own raster order
                keys.append(idx - n)
            else:  # raster order over the full (rows * side) x (cols * side) grid
                r, col = divmod(local - 1, cols)
                y, x = idx // side, idx % side
                keys.append((r * side + y) * (cols * side) + col * side + x)
        crop_ids_t, token_ids_t = torch.cat(crop_ids), torch.cat(token_ids)
        order = torch.cat(keys).argsort()
        crop_ids_t, token_ids_t = crop_ids_t[order], token_ids_t[order]
        if post is not None:
            kept = post[crop_ids_t, token_ids_t]
        else:
            kept = projector(pre[crop_ids_t, token_ids_t])
        indices = ((crop_ids_t - first) * n + token_ids_t).sort().values
        images.append(KeptImage(features=kept, indices=indices, slots=None))
        first += c
    counts = _next_placeholder_counts(model, crops, n, image_sizes)
    return FamilyResult(images, counts, token)
