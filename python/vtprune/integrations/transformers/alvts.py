"""ALVTS layer-wise routing (SPEC §3) wired into a Llama-family decoder.

:func:`apply_layerwise` gives every decoder layer (that has a selector) a forward that
scores the visual tokens entering it with the layer's :class:`vtprune.LowRankSelector`,
keeps the top ``floor(ratio * N)``, and runs the layer through :func:`vtprune.route_layer`:
the kept visual tokens and all text tokens go through the layer as one shorter sequence, in
their original order; the others skip it unchanged. The layer's own attention mask, rotary
``(cos, sin)`` and ``position_ids`` are cut down to the routed tokens (gathered, not
recomputed), so each routed token sees the same positions and the same causal order as in
the full sequence, whatever the attention implementation and position scheme.

The selector scores the layer's *normalized* input (``layer.input_layernorm(hidden)``),
since that is what the layer's ``W_q``/``W_k`` (which the selector approximates) act on.

Which tokens are visual comes from the ``input_ids`` the model is called with (the
config's image token); when the model is called with ``inputs_embeds`` (e.g. after
:func:`prune_inputs`, whose ``PruneInfo.visual_mask`` is that mask), set
:attr:`LayerwiseRouting.visual_mask` first. A model without an image token (a plain causal
LM) takes the visual tokens of an ``input_ids`` call from ``visual_mask`` too when its shape
matches; any other ``input_ids`` call (text only, ``generate``'s decode steps) has none.

With a KV cache (``generate``), each layer caches only the tokens routed through it, which
is what ALVTS means: later tokens attend at that layer to what went through it. Decoding
steps carry no visual tokens and run the layers unchanged. A padded batch cannot be
continued that way (the model's 2-D padding mask would no longer line up with the shorter
caches), so generation with padding and ``ratio < 1`` raises; run such batches row by row.
Unrouted layers (``None`` selectors) cache every token, so with ``ratio < 1`` the caches
differ in length: SDPA and FlashAttention decode without a mask and handle that, but an
implementation that builds one mask for all layers (eager, flex) cannot, and raises.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ... import _validation as V
from ...alvts import LowRankSelector, alvts_scores, route_layer
from ._compat import need, unsupported


def decoder_layers(model: Any) -> Any:
    """The decoder's ``nn.ModuleList`` of layers (multimodal wrappers or a plain causal LM)."""
    for path in ("model.language_model.layers", "language_model.layers", "model.layers", "layers"):
        cur = model
        for name in path.split("."):
            cur = getattr(cur, name, None)
            if cur is None:
                break
        if cur is not None and isinstance(cur, torch.nn.ModuleList):
            return cur
    raise unsupported(model, "has no decoder layers at model.language_model.layers or model.layers")


def lowrank_selectors(model: Any, rank: int) -> list[LowRankSelector]:
    """One :class:`vtprune.LowRankSelector` per decoder layer, from the truncated SVD of its
    ``q_proj``/``k_proj`` weights (multi-head form, grouped-query aware). Calibrate them
    with :func:`vtprune.calibrate_lowrank` for a better approximation.

    Example::

        selectors = lowrank_selectors(model, rank=64)
    """
    selectors = []
    for layer in decoder_layers(model):
        attn = need(layer, "self_attn", model)
        w_q, w_k = need(attn, "q_proj.weight", model), need(attn, "k_proj.weight", model)
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None:
            raise unsupported(model, "has decoder attention without head_dim")
        selectors.append(
            LowRankSelector.from_weights(
                w_q.detach().float(),
                w_k.detach().float(),
                rank,
                head_dim=head_dim,
                num_heads=w_q.shape[0] // head_dim,
                num_kv_heads=w_k.shape[0] // head_dim,
            ).to(w_q.device)
        )
    return selectors


def _gather_seq(x: Tensor, order: Tensor, dim: int) -> Tensor:
    """``x`` indexed along ``dim`` by ``order [B, L']`` per batch row (``x`` batch-first or
    broadcast over the batch)."""
    batch = order.shape[0]
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, *x.shape[1:])
    index = order.view(batch, *([1] * (dim - 1)), order.shape[1], *([1] * (x.dim() - dim - 1)))
    expand = list(x.shape)
    expand[dim] = order.shape[1]
    return torch.gather(x, dim, index.expand(expand))


class LayerwiseRouting:
    """Handle returned by :func:`apply_layerwise`: ``remove()`` restores the model.

    Attributes:
        visual_mask: bool ``[B, L]`` marking the visual tokens, for calls made with
            ``inputs_embeds``; calls with ``input_ids`` derive it from the image token, or,
            on a model without one, use it when its shape matches (else have no visual tokens).
        kept: ``{layer index: [B, k] positions of the visual tokens routed through it}``,
            from the last call that had visual tokens.
    """

    def __init__(self, model: Any, selectors: Sequence[LowRankSelector | None], ratio: float, backend: str) -> None:
        self.model = model
        self.ratio = ratio
        self.backend = backend
        self.visual_mask: Tensor | None = None
        self.kept: dict[int, Tensor] = {}
        self._current: Tensor | None = None
        self._padding: Tensor | None = None
        self._padded = False
        self._shortened = False  # the cache's prefill routed fewer than all visual tokens
        self._unrouted = any(selector is None for selector in selectors)
        self._image_token = getattr(model.config, "image_token_id", None)
        if self._image_token is None:
            self._image_token = getattr(model.config, "image_token_index", None)
        self._layers = decoder_layers(model)
        if len(selectors) != len(self._layers):
            raise ValueError(
                f"selectors must hold one LowRankSelector (or None) per decoder layer ({len(self._layers)}); "
                f"got {len(selectors)}"
            )
        self._patched: list[torch.nn.Module] = []
        self._hook = model.register_forward_pre_hook(self._before_model, with_kwargs=True)
        try:
            for i, (layer, selector) in enumerate(zip(self._layers, selectors)):
                if selector is None:
                    continue
                if not isinstance(selector, LowRankSelector):
                    raise TypeError(f"selectors[{i}] must be a LowRankSelector or None; got {type(selector).__name__}")
                need(layer, "input_layernorm", model)
                layer.forward = self._routed_forward(i, layer, selector, layer.forward)
                self._patched.append(layer)
        except Exception:
            self.remove()
            raise

    # -- visual mask of the current call ----------------------------------------------

    def _before_model(self, module: Any, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None:
            if self._image_token is not None:
                mask = input_ids == int(self._image_token)
            elif self.visual_mask is not None and tuple(self.visual_mask.shape) == tuple(input_ids.shape):
                mask = self.visual_mask.to(input_ids.device)
            else:
                # no image token to find them by: a text-only call, or a decode step after a
                # prefill made with inputs_embeds (whose visual_mask has the prompt's shape)
                mask = None
        elif embeds is not None:
            if self.visual_mask is None or tuple(self.visual_mask.shape) != tuple(embeds.shape[:2]):
                got = None if self.visual_mask is None else tuple(self.visual_mask.shape)
                raise ValueError(
                    f"called with inputs_embeds {tuple(embeds.shape[:2])}: set LayerwiseRouting.visual_mask to a bool "
                    f"tensor of that shape first (got {got})"
                )
            mask = self.visual_mask.to(embeds.device)
        else:
            mask = None
        attention_mask = kwargs.get("attention_mask")
        has_visual = mask is not None and bool(mask.any())
        cache = kwargs.get("past_key_values")
        cached = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        if has_visual and cached:
            raise ValueError("ALVTS routing cannot add visual tokens to a non-empty KV cache (prefill them in one call)")
        # only a call with visual tokens scores them or shortens the caches, so only it asks
        padded = has_visual and isinstance(attention_mask, Tensor) and bool((attention_mask == 0).any())
        if not cached:  # a prefill: remember how it fills the cache for the decode steps after it
            self._shortened = has_visual and self.ratio < 1.0
            self._padded = self._shortened and padded
        elif self._shortened and self._padded:
            raise ValueError(
                "generation with ALVTS routing (ratio < 1) needs an unpadded batch: the padding mask no longer lines "
                "up with the layers' shorter caches; generate row by row"
            )
        elif self._shortened and self._unrouted and self._masks_every_layer():
            raise ValueError(
                f"generation with ALVTS routing (ratio < 1) and unrouted (None) layers cannot use the "
                f"{self._attn_implementation()!r} attention implementation: unrouted layers cache all tokens and "
                "routed ones fewer, and it builds one decode mask for a single cache length; route every layer "
                "(a selector for each) or use attn_implementation='sdpa'"
            )
        self._current = mask
        # the 2-D padding mask of a padded call, for the scores: padding is neither query nor key
        # there (without padding the scores need no mask, and each layer saves the reordering)
        self._padding = attention_mask if padded and attention_mask.dim() == 2 else None

    def _attn_implementation(self) -> str | None:
        """The decoder's attention implementation, read per call (``set_attn_implementation`` may change it)."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "_attn_implementation", None)

    def _masks_every_layer(self) -> bool:
        """Whether decode steps get a materialized mask of one length for every layer. SDPA and
        FlashAttention skip the mask of an unpadded one-token step (each layer attends to its
        whole cache); eager and flex build it, from one layer's cache length."""
        impl = self._attn_implementation()
        return not (impl == "sdpa" or (isinstance(impl, str) and impl.startswith("flash_attention")))

    # -- the routed layer -------------------------------------------------------------

    def _routed_forward(self, index: int, layer: Any, selector: LowRankSelector, original: Any) -> Any:
        def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
            mask = self._current
            if mask is None or tuple(mask.shape) != tuple(hidden_states.shape[:2]) or not bool(mask.any()):
                return original(hidden_states, *args, **kwargs)
            if args:
                raise unsupported(self.model, "passes positional arguments besides hidden_states to its decoder layers")
            batch, length = mask.shape
            n = int(mask[0].sum())
            k = math.floor(self.ratio * n)
            normed = layer.input_layernorm(hidden_states)
            pad = self._padding
            pad = pad.to(mask.device) if pad is not None and tuple(pad.shape) == tuple(mask.shape) else None
            scores = alvts_scores(normed, selector, mask, attention_mask=pad, causal=True, backend=self.backend)  # [B, N]
            top = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
            visual_pos = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :n]  # visual positions, in order
            keep_idx = torch.gather(visual_pos, 1, top).sort(dim=-1).values
            self.kept[index] = keep_idx
            extras: dict[str, Any] = {}

            def layer_fn(sub: Tensor, position_ids: Tensor) -> Tensor:
                # route_layer hands us the positions (in 0..L-1) of the routed tokens: with
                # arange position ids those are exactly the gather order
                order = position_ids
                kw = dict(kwargs)
                am = kw.get("attention_mask")
                if isinstance(am, Tensor):
                    if am.dim() == 4 and am.shape[-1] == length and am.shape[-2] == length:
                        am = _gather_seq(_gather_seq(am, order, 2), order, 3)
                    elif am.dim() == 2 and am.shape[-1] == length:
                        am = _gather_seq(am, order, 1)
                    else:
                        raise unsupported(self.model, f"gives its decoder layers an attention mask of shape {tuple(am.shape)}")
                    kw["attention_mask"] = am
                elif am is not None:
                    raise unsupported(
                        self.model,
                        f"gives its decoder layers a {type(am).__name__} attention mask; ALVTS routing cuts down "
                        "tensor masks (the eager and sdpa implementations) or none",
                    )
                pe = kw.get("position_embeddings")
                if pe is not None:
                    kw["position_embeddings"] = tuple(_gather_seq(t, order, 1) for t in pe)
                pid = kw.get("position_ids")
                if isinstance(pid, Tensor):
                    kw["position_ids"] = _gather_seq(pid, order, 1) if pid.dim() == 2 else torch.stack(
                        [_gather_seq(p, order, 1) for p in pid]
                    )
                cp = kw.get("cache_position")
                if isinstance(cp, Tensor):
                    kw["cache_position"] = cp[: order.shape[1]]
                out = original(sub, **kw)
                if isinstance(out, (tuple, list)):
                    extras["rest"] = tuple(out[1:])
                    return out[0]
                return out

            positions = torch.arange(length, device=hidden_states.device).expand(batch, length)
            result = route_layer(hidden_states, keep_idx, layer_fn, visual_mask=mask, position_ids=positions)
            return (result, *extras["rest"]) if "rest" in extras else result

        return forward

    def remove(self) -> None:
        """Restore every layer's own forward and drop the model hook."""
        for layer in self._patched:
            if "forward" in vars(layer):
                del layer.forward
        self._patched = []
        self._hook.remove()

    def __enter__(self) -> "LayerwiseRouting":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply_layerwise(
    model: Any, selectors: Sequence[LowRankSelector | None], ratio: float, *, backend: str = "auto"
) -> LayerwiseRouting:
    """Route only the top ``floor(ratio * N)`` visual tokens through each decoder layer (ALVTS).

    Args:
        model: a model with a Llama-family decoder (``LlavaForConditionalGeneration``,
            ``LlavaNextForConditionalGeneration``, or a causal LM with ``model.layers``),
            whose layers take ``hidden_states`` plus keyword ``attention_mask``,
            ``position_ids``, ``position_embeddings`` and have ``input_layernorm``. Without
            an image token id in its config, set ``handle.visual_mask`` to mark the visual
            tokens of the prompt (calls of another shape have none).
        selectors: one :class:`vtprune.LowRankSelector` per decoder layer (``None`` leaves
            that layer unrouted; then ``generate`` with ``ratio < 1`` needs SDPA or
            FlashAttention, not eager), e.g. :func:`lowrank_selectors`.
        ratio: share of the visual tokens routed through each layer, ``0 <= ratio <= 1``.
        backend: backend of :func:`vtprune.alvts_scores`.

    Returns:
        A :class:`LayerwiseRouting` handle (also a context manager); ``handle.remove()``
        restores the model.

    Example::

        from vtprune.integrations.transformers import apply_layerwise, lowrank_selectors

        with apply_layerwise(model, lowrank_selectors(model, rank=64), ratio=0.5):
            logits = model(**inputs).logits          # inputs from the LLaVA processor
            new_tokens = model.generate(**inputs, max_new_tokens=20)   # unpadded batch
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must be a float in [0, 1]; got {ratio!r}")
    if isinstance(selectors, (str, bytes)) or not isinstance(selectors, Sequence):
        raise TypeError(
            f"selectors must be a sequence of LowRankSelector (one per decoder layer); got {type(selectors).__name__}"
        )
    return LayerwiseRouting(model, list(selectors), float(ratio), V.check_backend(backend))
