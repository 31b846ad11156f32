"""Integrations of vtprune's ops with model libraries.

Each integration lives in its own subpackage and imports its library only when that
subpackage is imported, so ``import vtprune`` never needs them:

* :mod:`vtprune.integrations.transformers`: visual-token pruning for Hugging Face
  ``transformers`` LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL models, and ALVTS layer-wise
  routing in their decoders (``pip install 'vtprune[transformers]'``).
"""
