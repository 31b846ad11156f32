"""What every model family shares: ``prune_inputs``, :class:`PrunedModel`, token selection
with the public ops, and rebuilding the language model's inputs from the kept tokens.

The family modules (:mod:`.llava`, :mod:`.qwen2_5_vl`) only compute, per image, the kept
visual features and where they sit; :func:`build_inputs` then lays every prompt out again:
the prompt's text tokens (those the ``attention_mask`` marks) in their order, each image's
placeholder run replaced by its kept features, rows left-padded to one length because
left padding is what ``generate`` needs for a decoder-only model. The input may be padded on
either side: only the mask is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ... import _validation as V
from ...ops import fused_scope_select, holov_select
from ._compat import require_transformers

METHODS = ("scope", "holov", "topk")
#: Default ``alpha`` per method (SPEC §1 and §2); ``topk`` has none.
DEFAULT_ALPHA = {"scope": 1.0, "holov": 0.09}
#: The processor outputs :func:`prune_inputs` understands; :class:`PrunedModel` routes these
#: keys to the pruning step and every other keyword to ``generate``/``forward``.
PROCESSOR_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "mm_token_type_ids",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)


# ----------------------------------------------------------------------------- argument checks


def check_method(method: Any, alpha: Any, options: Any) -> tuple[str, float | None, dict]:
    """Validate ``method``/``alpha``/``method_options``; fill in the method's default ``alpha``."""
    method = V.check_choice(method, "method", METHODS)
    if method == "topk":
        if alpha is not None:
            raise ValueError("alpha is not used by method='topk' (it ranks by saliency alone); pass alpha=None")
    else:
        alpha = DEFAULT_ALPHA[method] if alpha is None else V.check_alpha(alpha)
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(
            f"method_options must be a dict of keyword arguments for the selection op; got {type(options).__name__}"
        )
    allowed = {"scope": {"combine"}, "holov": {"rank_by", "num_crops"}, "topk": set()}[method]
    extra = set(options) - allowed
    if extra:
        raise ValueError(
            f"method_options for method={method!r} may hold {sorted(allowed) or 'nothing'}; got {sorted(extra)}"
        )
    return method, alpha, dict(options)


def check_keep(keep: Any) -> int:
    """``keep`` is a positive int (its upper bound, N, depends on the image)."""
    keep = V.check_int(keep, "keep")
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    return keep


def split_budget(total: int, parts: int) -> list[int]:
    """``total`` tokens over ``parts`` crops: ``total // parts`` each, the first ``total % parts`` one more."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ----------------------------------------------------------------------------- selection


def select_rows(
    method: str,
    features: Tensor | None,
    saliency: Tensor,
    ks: list[int],
    *,
    alpha: float | None,
    backend: str,
    options: dict,
    lengths: Tensor | None = None,
) -> list[Tensor]:
    """Kept token indices (ascending) of every row of ``saliency [R, N]``, row ``r`` keeping ``ks[r]``.

    ``features [R, N, D]`` are what the method measures similarity on (SCOPE: pre-projector,
    HoloV: projected; unused by ``topk``); ``saliency`` is CLS attention or attention
    received (summed over heads for SCOPE, averaged for HoloV). Rows with the same budget
    share one op call; a row with budget 0 gets an empty index tensor. ``lengths [R]``
    marks padded rows (only the first ``lengths[r]`` tokens are candidates).
    """
    out: list[Tensor | None] = [None] * len(ks)
    empty = torch.empty(0, dtype=torch.int64, device=saliency.device)
    by_k: dict[int, list[int]] = {}
    for row, k in enumerate(ks):
        if k == 0:
            out[row] = empty
        else:
            by_k.setdefault(k, []).append(row)
    for k, rows in by_k.items():
        sel = torch.tensor(rows, device=saliency.device)
        sal = saliency.index_select(0, sel)
        lens = None if lengths is None else lengths.index_select(0, sel.to(lengths.device))
        if method == "scope":
            idx = fused_scope_select(
                features.index_select(0, sel), sal, k, alpha, lengths=lens, backend=backend, **options
            )
        elif method == "holov":
            idx = holov_select(
                features.index_select(0, sel), sal, k, alpha=alpha, lengths=lens, backend=backend, **options
            )
        else:
            idx = topk_select(sal, k, lengths=lens)
        for j, row in enumerate(rows):
            out[row] = idx[j]
    return out  # type: ignore[return-value]


def topk_select(saliency: Tensor, k: int, *, lengths: Tensor | None = None) -> Tensor:
    """The ``k`` highest-saliency tokens per row, ascending; ties toward the lowest index.

    ``torch.topk`` does not promise an order among ties, so this is a stable descending
    sort instead (stable keeps the lower index first among equal keys). NaN ranks last.
    """
    sal = saliency.float().nan_to_num(nan=-math.inf)
    if lengths is not None:
        pos = torch.arange(sal.shape[1], device=sal.device)
        sal = sal.masked_fill(pos[None, :] >= lengths.to(sal.device)[:, None], -math.inf)
    order = torch.sort(sal, dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values


# ----------------------------------------------------------------------------- rebuilding the inputs


@dataclass
class KeptImage:
    """One image's contribution to the pruned prompt.

    Attributes:
        features: ``[k, D_text]`` the kept tokens, in the order they enter the prompt.
        indices: ``[k]`` int64, which of the image's ``N`` candidate tokens were kept
            (ascending), for inspection.
        slots: ``[k]`` int64 or ``None``: for each kept token, its index in the image's
            placeholder run, when the model needs the original position ids of the kept
            tokens (Qwen2.5-VL's M-RoPE); ``None`` when positions are renumbered.
    """

    features: Tensor
    indices: Tensor
    slots: Tensor | None = None


@dataclass
class FamilyResult:
    """What a family module hands to :func:`build_inputs`."""

    images: list[KeptImage]
    #: how many placeholder tokens the unpruned model expects for each image, in image order
    placeholder_counts: list[int]
    #: the token id of the image placeholders in ``input_ids``
    image_token_id: int
    #: ``[3, B, L]`` original multimodal position ids (Qwen2.5-VL), or ``None``
    mrope_positions: Tensor | None = None


@dataclass
class PruneInfo:
    """What :func:`prune_inputs` kept, returned with ``return_info=True``.

    Attributes:
        indices: per image (in the order the model fills them), int64 ``[keep]``: the kept
            tokens among the image's ``N`` candidates, ascending (LLaVA-NeXT: crop ``c``'s
            token ``t`` is ``c * n + t``, ``n`` tokens per crop).
        visual_mask: bool ``[B, L']``, True at the kept visual tokens of the pruned inputs
            (e.g. for :attr:`LayerwiseRouting.visual_mask`).
    """

    indices: list[Tensor]
    visual_mask: Tensor


def placeholder_runs(input_ids: Tensor, image_token_id: int, counts: list[int]) -> list[tuple[int, int]]:
    """``(row, start)`` of each image's placeholder run, images in the order the model fills them.

    Like the models' own ``masked_scatter``, images take the placeholder tokens in row-major
    order, ``counts[i]`` each. Every image's placeholders must be one contiguous run in one
    row (any real prompt has them so; otherwise kept tokens would have no defined place).
    """
    ids = input_ids.detach().cpu()
    per_row = [(row == image_token_id).nonzero().flatten().tolist() for row in ids]
    total = sum(len(p) for p in per_row)
    if total != sum(counts):
        raise ValueError(
            f"input_ids hold {total} image tokens (id {image_token_id}) but the images need {sum(counts)} "
            f"({counts}); the prompt and pixel inputs do not match"
        )
    runs = []
    image = 0
    for row, positions in enumerate(per_row):
        cursor = 0
        while cursor < len(positions):
            n = counts[image]
            chunk = positions[cursor : cursor + n]
            if len(chunk) < n:
                raise ValueError(
                    f"image {image} needs {n} image tokens but row {row} of input_ids has only {len(chunk)} left; "
                    "each image's tokens must lie in one row"
                )
            if chunk[-1] - chunk[0] + 1 != n:
                raise ValueError(f"the {n} image tokens of image {image} (row {row}) must be contiguous in input_ids")
            runs.append((row, chunk[0]))
            cursor += n
            image += 1
    return runs


def build_inputs(
    model: Any, input_ids: Tensor, attention_mask: Tensor | None, result: FamilyResult
) -> tuple[dict[str, Tensor], Tensor]:
    """The pruned ``inputs_embeds``, ``attention_mask`` and ``position_ids`` (left-padded),
    and the bool ``[B, L']`` mask of the visual tokens among them.

    ``position_ids`` are ``[B, L']`` (0, 1, 2, ... over each row's tokens) without
    ``result.mrope_positions``; with them, ``[4, B, L']``: that text row, then the original
    3-D positions of every kept token (text and image), the layout Qwen2.5-VL reads.
    """
    embed = model.get_input_embeddings()
    text_embeds = embed(input_ids)
    batch, length = input_ids.shape
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    runs = placeholder_runs(input_ids, result.image_token_id, result.placeholder_counts)
    row_images: list[list[tuple[int, int, KeptImage]]] = [[] for _ in range(batch)]
    for (row, start), count, image in zip(runs, result.placeholder_counts, result.images):
        row_images[row].append((start, count, image))

    mpos = result.mrope_positions
    rows_embeds: list[Tensor] = []
    rows_visual: list[Tensor] = []
    rows_mpos: list[Tensor] = []
    device = text_embeds.device
    for b in range(batch):
        pieces, pos_pieces, visual = [], [], []
        cursor = 0
        for start, count, image in row_images[b] + [(length, 0, None)]:
            text_idx = torch.arange(cursor, start, device=device)
            text_idx = text_idx[valid[b, cursor:start]]
            pieces.append(text_embeds[b, text_idx])
            visual.append(torch.zeros(text_idx.shape[0], dtype=torch.bool, device=device))
            if mpos is not None:
                pos_pieces.append(mpos[:, b, text_idx])
            if image is not None:
                pieces.append(image.features.to(device=device, dtype=text_embeds.dtype))
                visual.append(torch.ones(image.features.shape[0], dtype=torch.bool, device=device))
                if mpos is not None:
                    pos_pieces.append(mpos[:, b, start + image.slots.to(device)])
            cursor = start + count
        rows_embeds.append(torch.cat(pieces))
        rows_visual.append(torch.cat(visual))
        if mpos is not None:
            rows_mpos.append(torch.cat(pos_pieces, dim=1))

    new_len = max(r.shape[0] for r in rows_embeds)
    out_embeds = text_embeds.new_zeros((batch, new_len, text_embeds.shape[-1]))
    mask_dtype = torch.long if attention_mask is None else attention_mask.dtype
    out_mask = torch.zeros((batch, new_len), dtype=mask_dtype, device=device)
    out_visual = torch.zeros((batch, new_len), dtype=torch.bool, device=device)
    for b, rows in enumerate(rows_embeds):
        n = rows.shape[0]
        if n:
            out_embeds[b, new_len - n :] = rows
            out_mask[b, new_len - n :] = 1
            out_visual[b, new_len - n :] = rows_visual[b]
    text_pos = (out_mask.long().cumsum(-1) - 1).clamp_min(0).masked_fill(out_mask == 0, 0)
    out = {"inputs_embeds": out_embeds, "attention_mask": out_mask}
    if mpos is None:
        out["position_ids"] = text_pos
    else:
        grid = torch.zeros((3, batch, new_len), dtype=mpos.dtype, device=device)
        for b, rows in enumerate(rows_mpos):
            n = rows.shape[1]
            if n:
                grid[:, b, new_len - n :] = rows
        out["position_ids"] = torch.cat([text_pos[None].to(mpos.dtype), grid], dim=0)
    return out, out_visual


# ----------------------------------------------------------------------------- entry points


def _family(model: Any) -> Callable[..., FamilyResult]:
    """The family module's pruning function for ``model``'s class."""
    transformers = require_transformers()
    from . import llava, qwen2_5_vl

    table = [
        ("LlavaNextForConditionalGeneration", llava.prune_llava_next),
        ("LlavaForConditionalGeneration", llava.prune_llava),
        ("Qwen2_5_VLForConditionalGeneration", qwen2_5_vl.prune_qwen2_5_vl),
    ]
    for name, fn in table:
        cls = getattr(transformers, name, None)
        if cls is not None and isinstance(model, cls):
            return fn
    supported = ", ".join(name for name, _ in table)
    raise TypeError(f"model must be one of {supported} (or a subclass); got {type(model).__name__}")


@torch.no_grad()
def prune_inputs(
    model: Any,
    *,
    method: str = "scope",
    keep: int = 64,
    alpha: float | None = None,
    backend: str = "auto",
    method_options: dict | None = None,
    return_info: bool = False,
    **processor_outputs: Any,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], PruneInfo]:
    """Inputs for ``model.generate``/``model(...)`` with every image pruned to ``keep`` tokens.

    Runs the vision tower once (with the attention implementation the model was loaded
    with: no attention maps are requested, the saliency is recomputed for the one row it
    needs), selects each image's ``keep`` tokens with ``method``, and returns the language
    model's inputs. What "features" and "saliency" are per family:

    * LLaVA-1.5 (CLIP tower): the patch features of ``config.vision_feature_layer`` (-2)
      and the CLS->patch attention of the layer that produced them. SCOPE selects on the
      features before the projector (CLS attention summed over heads), HoloV on the
      projected ones (averaged over heads), ``topk`` keeps the highest CLS attention.
      ``N`` = patches per image (576 for ViT-L/336).
    * LLaVA-NeXT: the same per 576-token crop (the base image, then each high-resolution
      crop); ``keep`` is split over the image's crops (``keep // C`` each, the first
      ``keep % C`` one more). Kept tokens enter the prompt as the official SCOPE code lays
      them out: the base crop's, then the high-resolution crops' in raster order of the
      full grid, without the unpadding and the ``image_newline`` tokens of the unpruned
      model. ``N`` = 576 x crops of the image.
    * Qwen2.5-VL (no CLS): saliency = attention each merged token receives in the last
      vision block (mean over the block's queries and heads, summed over the 2x2 patches),
      computed with :func:`vtprune.attention_importance`; SCOPE measures similarity on the
      block's output (the merger's input, 4 patches concatenated), HoloV on the merged
      tokens. Kept tokens keep their original M-RoPE position ids. ``N`` = merged tokens.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``
            or ``Qwen2_5_VLForConditionalGeneration``.
        method: ``"scope"`` (:func:`vtprune.fused_scope_select`), ``"holov"``
            (:func:`vtprune.holov_select`) or ``"topk"`` (highest saliency).
        keep: visual tokens per image, ``1 <= keep <= N`` for every image.
        alpha: SCOPE's saliency exponent (default 1.0) or HoloV's variance weight
            (default 0.09); must be ``None`` for ``topk``.
        backend: backend of the selection ops (``"auto"`` picks the fastest here).
        method_options: extra keywords of the op: ``combine`` (SCOPE), ``rank_by`` /
            ``num_crops`` (HoloV).
        return_info: also return a :class:`PruneInfo`: the kept indices of each image and
            the mask of the visual tokens in the pruned inputs.
        **processor_outputs: what the model's processor returned: ``input_ids`` (required),
            ``attention_mask``, ``pixel_values``, and ``image_sizes`` (LLaVA-NeXT) or
            ``image_grid_thw`` / ``mm_token_type_ids`` (Qwen2.5-VL). Without
            ``pixel_values`` the prompt passes through unpruned.

    Returns:
        ``{"inputs_embeds", "attention_mask", "position_ids"}``, rows left-padded;
        ``position_ids`` is ``[B, L']`` for LLaVA and ``[4, B, L']`` (text positions, then
        M-RoPE t/h/w) for Qwen2.5-VL. With ``return_info``, ``(inputs, info)``.
        ``generate`` given only ``inputs_embeds`` returns only the new tokens.

    Example::

        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        from vtprune.integrations.transformers import prune_inputs

        model = LlavaForConditionalGeneration.from_pretrained(
            "llava-hf/llava-1.5-7b-hf", dtype=torch.float16, device_map="cuda")
        processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")
        inputs = processor(images=image, text="USER: <image>\\nWhat is shown? ASSISTANT:",
                           return_tensors="pt").to("cuda", torch.float16)
        pruned = prune_inputs(model, method="scope", keep=64, **inputs)
        new_tokens = model.generate(**pruned, max_new_tokens=30)
        print(processor.batch_decode(new_tokens, skip_special_tokens=True))
    """
    method, alpha, options = check_method(method, alpha, method_options)
    keep = check_keep(keep)
    backend = V.check_backend(backend)
    fn = _family(model)
    unknown = sorted(set(processor_outputs) - set(PROCESSOR_KEYS))
    if unknown:
        raise TypeError(f"prune_inputs got unexpected processor outputs {unknown}; it understands {list(PROCESSOR_KEYS)}")
    input_ids = processor_outputs.get("input_ids")
    V.check_tensor(input_ids, "input_ids")
    if input_ids.dim() != 2 or input_ids.dtype not in V.INDEX_DTYPES:
        raise ValueError(f"input_ids must be an int tensor [B, L]; got {input_ids.dtype} {tuple(input_ids.shape)}")
    attention_mask = processor_outputs.get("attention_mask")
    if attention_mask is not None:
        V.check_tensor(attention_mask, "attention_mask")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}; got {tuple(attention_mask.shape)}"
            )
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if processor_outputs.get(key) is not None:
            raise ValueError(f"prune_inputs prunes images only; got {key} (video inputs are not supported)")
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    result = fn(
        model,
        input_ids=input_ids,
        attention_mask=attention_mask,
        processor_outputs=processor_outputs,
        method=method,
        keep=keep,
        alpha=alpha,
        backend=backend,
        options=options,
    )
    inputs, visual = build_inputs(model, input_ids, attention_mask, result)
    if return_info:
        return inputs, PruneInfo(indices=[image.indices for image in result.images], visual_mask=visual)
    return inputs


class PrunedModel:
    """A model whose ``generate``/``__call__`` prune every image to ``keep`` tokens first.

    Processor outputs (``input_ids``, ``attention_mask``, ``pixel_values``,
    ``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids``) go through
    :func:`prune_inputs`; every other keyword goes to the wrapped model unchanged. Any other
    attribute is the wrapped model's.

    Example::

        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        from vtprune.integrations.transformers import PrunedModel

        name = "Qwen/Qwen2.5-VL-7B-Instruct"
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            name, dtype=torch.bfloat16, device_map="cuda")
        processor = AutoProcessor.from_pretrained(name)
        messages = [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                 {"type": "text", "text": "Describe the image."}]}]
        inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt").to("cuda")
        pruned = PrunedModel(model, method="holov", keep=128)
        new_tokens = pruned.generate(**inputs, max_new_tokens=64)
        print(processor.batch_decode(new_tokens, skip_special_tokens=True)[0])
    """

    def __init__(
        self,
        model: Any,
        method: str = "scope",
        keep: int = 64,
        *,
        alpha: float | None = None,
        backend: str = "auto",
        method_options: dict | None = None,
    ) -> None:
        _family(model)
        self.method, self.alpha, self.method_options = check_method(method, alpha, method_options)
        self.keep = check_keep(keep)
        self.backend = V.check_backend(backend)
        self.model = model

    def prune(self, **processor_outputs: Any) -> dict[str, Tensor]:
        """:func:`prune_inputs` with this wrapper's method, budget and options."""
        return prune_inputs(
            self.model,
            method=self.method,
            keep=self.keep,
            alpha=self.alpha,
            backend=self.backend,
            method_options=self.method_options,
            **processor_outputs,
        )

    def _split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        processor = {k: kwargs.pop(k) for k in PROCESSOR_KEYS if k in kwargs}
        if "input_ids" not in processor:
            raise ValueError("PrunedModel needs the processor outputs, input_ids at least")
        for key in ("inputs_embeds", "position_ids"):
            if key in kwargs:
                raise ValueError(f"PrunedModel builds {key} itself; pass the processor outputs instead")
        return processor, kwargs

    def generate(self, **kwargs: Any) -> Any:
        """``model.generate`` on the pruned inputs; returns only the new tokens."""
        processor, rest = self._split(dict(kwargs))
        return self.model.generate(**self.prune(**processor), **rest)

    def __call__(self, **kwargs: Any) -> Any:
        """``model(...)`` on the pruned inputs."""
        processor, rest = self._split(dict(kwargs))
        return self.model(**self.prune(**processor), **rest)

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"PrunedModel({type(self.model).__name__}, method={self.method!r}, keep={self.keep})"
