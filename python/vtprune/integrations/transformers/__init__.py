"""Visual-token pruning for Hugging Face ``transformers`` vision-language models.

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5, CLIP tower),
``LlavaNextForConditionalGeneration`` (LLaVA-NeXT, per-crop) and
``Qwen2_5_VLForConditionalGeneration``; tested with transformers >= 5.2.

* :func:`prune_inputs` runs the vision tower once, keeps ``keep`` tokens per image with
  SCOPE, HoloV or top-k, and returns ``inputs_embeds``/``attention_mask``/``position_ids``
  for ``model.generate`` or ``model(...)``.
* :class:`PrunedModel` wraps a model so ``PrunedModel(model, "scope", 64).generate(**inputs)``
  prunes on the way in.
* :func:`apply_layerwise` wires ALVTS routing (:func:`vtprune.route_layer`) into every
  decoder layer; :func:`lowrank_selectors` builds its per-layer selectors.
* :func:`clip_features_and_cls_attention` and :func:`vision_features_and_saliency` expose
  the features and saliency the selection uses.

Example::

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from vtprune.integrations.transformers import PrunedModel

    name = "llava-hf/llava-1.5-7b-hf"
    model = LlavaForConditionalGeneration.from_pretrained(name, dtype=torch.float16, device_map="cuda")
    processor = AutoProcessor.from_pretrained(name)
    inputs = processor(images=[image], text=["USER: <image>\\nDescribe it. ASSISTANT:"],
                       return_tensors="pt").to("cuda", torch.float16)
    new_tokens = PrunedModel(model, method="scope", keep=64).generate(**inputs, max_new_tokens=40)
    print(processor.batch_decode(new_tokens, skip_special_tokens=True)[0])

Importing this package imports ``transformers``; without it, the ``ImportError`` says
``pip install 'vtprune[transformers]'``.
"""

from __future__ import annotations

from ._compat import MIN_VERSION_STR, require_transformers

require_transformers()

from .alvts import LayerwiseRouting, apply_layerwise, lowrank_selectors  # noqa: E402
from .common import PrunedModel, prune_inputs  # noqa: E402
from .llava import clip_features_and_cls_attention  # noqa: E402
from .qwen2_5_vl import vision_features_and_saliency  # noqa: E402

__all__ = [
    "LayerwiseRouting",
    "MIN_VERSION_STR",
    "PrunedModel",
    "apply_layerwise",
    "clip_features_and_cls_attention",
    "lowrank_selectors",
    "prune_inputs",
    "vision_features_and_saliency",
]
