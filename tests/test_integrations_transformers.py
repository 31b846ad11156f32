"""vtprune.integrations.transformers on tiny random-weight LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL.

The models are built from configs here (nothing is downloaded) and the inputs by hand, as
each model's processor would lay them out (image tokens repeated the right number of
times, ``pixel_values``, ``image_sizes``/``image_grid_thw``). Checks per family: pruning
keeps exactly ``keep`` tokens per image and ``generate`` runs on the result; ``keep = N``
reproduces the unpruned model's logits; a padded batch of two different images gives each
row what that image gives alone; the vision tower keeps its attention implementation (and
really runs SDPA). The CLS-row recomputation is checked against an eager tower's
``output_attentions``, the selections against the ops called on independently computed
features, and ALVTS routing against the unmodified model and the routing contract.
"""

from __future__ import annotations

import copy
import inspect
import math
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="pip install 'vtprune[transformers]'")

import vtprune  # noqa: E402
from vtprune.integrations.transformers import (  # noqa: E402
    PrunedModel,
    apply_layerwise,
    clip_features_and_cls_attention,
    lowrank_selectors,
    prune_inputs,
    vision_features_and_saliency,
)
from vtprune.integrations.transformers import _compat  # noqa: E402

IMG = 127  # image token of the LLaVA models (last id of a 128-token vocabulary)
Q_IMG, Q_START, Q_END = 150, 152, 153  # Qwen2.5-VL image / vision start / vision end tokens
ATOL = 1e-5


def _clip_config():
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=56, patch_size=14, projection_dim=32,
    )


def _llama_config(layers=2):
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0,
    )


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config=_clip_config(), text_config=_llama_config(), image_token_index=IMG, image_seq_length=16
    )
    return transformers.LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def llava_next():
    torch.manual_seed(1)
    cfg = transformers.LlavaNextConfig(
        vision_config=_clip_config(), text_config=_llama_config(), image_token_index=IMG,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
    )
    return transformers.LlavaNextForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(2)
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        image_token_id=Q_IMG, video_token_id=151, vision_start_token_id=Q_START, vision_end_token_id=Q_END,
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _pad_left(rows, pad=0):
    """Left-padded ``input_ids`` and ``attention_mask`` from lists of token ids."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r)
        mask[b, length - len(r):] = 1
    return ids, mask


def _text(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (n,), generator=g).tolist()


def _valid_logits(model, inputs):
    out = model(**inputs).logits
    return [out[b, inputs["attention_mask"][b].bool()] for b in range(out.shape[0])]


# ----------------------------------------------------------------------------- CLS attention


@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_cls_row_recomputation_matches_eager_attentions(llava, layer):
    tower = llava.model.vision_tower
    before = tower.config._attn_implementation
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    feats, attn = clip_features_and_cls_attention(tower, pixels, layer)

    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    ref = eager(pixels, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(feats, ref.hidden_states[layer], atol=ATOL, rtol=1e-5)
    # hidden_states[j] is produced by encoder layer j - 1, whose attentions are attentions[j - 1]
    j = layer % (len(ref.attentions) + 1)
    torch.testing.assert_close(attn, ref.attentions[j - 1][:, :, 0, :].float(), atol=1e-6, rtol=1e-5)
    assert tower.config._attn_implementation == before == "sdpa"


def test_feature_layer_of_the_embeddings_is_rejected(llava):
    with pytest.raises(ValueError, match="patch embeddings"):
        clip_features_and_cls_attention(llava.model.vision_tower, torch.randn(1, 3, 56, 56), 0)


# ----------------------------------------------------------------------------- LLaVA-1.5


def _llava_batch():
    """Two rows of different lengths (left padding); row 0 has two images, row 1 one."""
    rows = [
        [1] + _text(3, 0) + [IMG] * 16 + _text(2, 1) + [IMG] * 16 + _text(4, 2),
        [1] + _text(6, 3) + [IMG] * 16 + _text(2, 4),
    ]
    ids, mask = _pad_left(rows)
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    return ids, mask, pixels


def _independent_llava_selection(model, pixels, method, keep):
    """Indices and kept features from an eager tower's attentions, the reference backend and
    the model's projector: what prune_inputs must reproduce without attention maps."""
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    out = eager(pixels, output_attentions=True, output_hidden_states=True)
    pre = out.hidden_states[-2][:, 1:]
    cls = out.attentions[-2][:, :, 0, 1:].float()
    proj = model.model.multi_modal_projector
    if method == "scope":
        idx = vtprune.fused_scope_select(pre, cls.sum(1), keep, 1.0, backend="reference")
    elif method == "holov":
        idx = vtprune.holov_select(proj(pre), cls.mean(1), keep, backend="reference")
    else:
        idx = torch.sort(cls.mean(1), dim=-1, descending=True, stable=True).indices[:, :keep].sort(-1).values
    return idx, proj(torch.stack([pre[i, idx[i]] for i in range(len(idx))]))


@pytest.mark.parametrize("method", ["scope", "holov", "topk"])
def test_llava_prunes_each_image_to_keep_and_generates(llava, method):
    ids, mask, pixels = _llava_batch()
    keep = 5
    inputs, info = prune_inputs(
        llava, method=method, keep=keep, input_ids=ids, attention_mask=mask, pixel_values=pixels, return_info=True
    )
    indices = info.indices
    images_per_row = (ids == IMG).sum(1) // 16
    text_per_row = ((ids != IMG) & mask.bool()).sum(1)
    assert info.visual_mask.sum(1).tolist() == (keep * images_per_row).tolist()
    assert inputs["attention_mask"].sum(1).tolist() == (text_per_row + keep * images_per_row).tolist()
    assert inputs["inputs_embeds"].shape[:2] == inputs["position_ids"].shape

    want_idx, want_feats = _independent_llava_selection(llava, pixels, method, keep)
    assert torch.equal(torch.stack(indices), want_idx)
    # the kept features sit where the images were, in order: row 0 = images 0 and 1, row 1 = image 2
    emb = inputs["inputs_embeds"]
    for b, (image, start) in enumerate([(0, 4), (2, 7)]):
        offset = emb.shape[1] - int(inputs["attention_mask"][b].sum())
        got = emb[b, offset + start : offset + start + keep]
        torch.testing.assert_close(got, want_feats[image], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(emb[0, 4 + keep + 2 : 4 + 2 * keep + 2], want_feats[1], atol=ATOL, rtol=1e-5)

    new = llava.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert new.shape == (2, 2)
    wrapped = PrunedModel(llava, method, keep).generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2, do_sample=False
    )
    assert torch.equal(wrapped, new)


def test_llava_keep_n_reproduces_the_unpruned_logits(llava):
    rows = [[1] + _text(3, 6) + [IMG] * 16 + _text(5, 7), [1] + _text(4, 8) + [IMG] * 16 + _text(4, 9)]
    ids, mask = _pad_left(rows)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(9))
    ref = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    for method in ("scope", "holov", "topk"):
        got = llava(**prune_inputs(llava, method=method, keep=16, input_ids=ids, attention_mask=mask, pixel_values=pixels)).logits
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-5)


def test_llava_padded_batch_rows_equal_each_image_alone(llava):
    ids, mask, pixels = _llava_batch()
    batch = _valid_logits(llava, prune_inputs(llava, keep=6, input_ids=ids, attention_mask=mask, pixel_values=pixels))
    for b, images in enumerate([slice(0, 2), slice(2, 3)]):
        row = ids[b, mask[b].bool()][None]
        alone = _valid_logits(llava, prune_inputs(llava, keep=6, input_ids=row, pixel_values=pixels[images]))[0]
        torch.testing.assert_close(batch[b], alone, atol=ATOL, rtol=1e-5)


def test_vision_tower_runs_sdpa_and_keeps_its_attention_implementation(llava, llava_next, qwen, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    towers = [(llava, llava.model.vision_tower), (llava_next, llava_next.model.vision_tower), (qwen, qwen.model.visual)]
    before = [(t.config._attn_implementation, m.config._attn_implementation) for m, t in towers]
    ids, mask, pixels = _llava_batch()
    prune_inputs(llava, keep=4, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert len(calls) == 3  # one SDPA call per CLIP layer: the eager path would make none
    ids, mask, pixels, sizes = _next_batch()
    prune_inputs(llava_next, keep=6, input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    qin = _qwen_batch()
    prune_inputs(qwen, keep=4, **qin)
    after = [(t.config._attn_implementation, m.config._attn_implementation) for m, t in towers]
    assert after == before
    assert all(a == "sdpa" for a, _ in after)


# ----------------------------------------------------------------------------- LLaVA-NeXT


def _next_batch():
    """Row 0: a 56x112 image (base + 1x2 crops); row 1: a 112x112 image (base + 2x2 crops).
    Placeholder counts are the unpruned model's (unpadded grid plus newline tokens)."""
    sizes = torch.tensor([[56, 112], [112, 112]])
    counts = [16 + 4 * 8 + 4, 16 + 8 * 8 + 8]
    rows = [[1] + _text(3, 10) + [IMG] * counts[0] + _text(2, 11), [1] + _text(5, 12) + [IMG] * counts[1] + _text(3, 13)]
    ids, mask = _pad_left(rows)
    pixels = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(14))
    return ids, mask, pixels, sizes


def test_llava_next_placeholder_counts_are_the_models(llava_next):
    ids, mask, pixels, sizes = _next_batch()
    out = llava_next(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    assert out.logits.shape[:2] == ids.shape  # the unpruned model accepts the hand-built prompt


def _next_reference(model, pixels, sizes):
    """Every crop token of every image, in the layout prune_inputs promises (base crop, then the
    high-resolution crops in raster order of the full grid), from HF's own tower outputs."""
    crops = [3, 5]
    grids = [(1, 2), (2, 2)]
    flat = torch.cat([pixels[i, :c] for i, c in enumerate(crops)])
    hidden = model.model.vision_tower(flat, output_hidden_states=True).hidden_states[-2][:, 1:]
    proj = model.model.multi_modal_projector(hidden)
    out, first = [], 0
    for c, (rows, cols) in zip(crops, grids):
        base = proj[first]
        grid = proj[first + 1 : first + c].view(rows, cols, 4, 4, -1).permute(0, 2, 1, 3, 4).reshape(-1, proj.shape[-1])
        out.append(torch.cat([base, grid]))
        first += c
    return out


@pytest.mark.parametrize("method", ["scope", "holov", "topk"])
def test_llava_next_prunes_per_crop_to_keep_and_generates(llava_next, method):
    ids, mask, pixels, sizes = _next_batch()
    keep = 7  # 3 crops -> 3 + 2 + 2; 5 crops -> 2 + 2 + 1 + 1 + 1
    inputs, info = prune_inputs(
        llava_next, method=method, keep=keep, input_ids=ids, attention_mask=mask, pixel_values=pixels,
        image_sizes=sizes, return_info=True,
    )
    indices = info.indices
    text_per_row = ((ids != IMG) & mask.bool()).sum(1)
    assert inputs["attention_mask"].sum(1).tolist() == (text_per_row + keep).tolist()
    per_crop = [[int(((idx >= c * 16) & (idx < (c + 1) * 16)).sum()) for c in range(n)] for idx, n in zip(indices, [3, 5])]
    assert per_crop == [[3, 2, 2], [2, 2, 1, 1, 1]]
    new = llava_next.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert new.shape == (2, 2)


def test_llava_next_keep_n_keeps_every_crop_token_in_layout(llava_next):
    ids, mask, pixels, sizes = _next_batch()
    feats = _next_reference(llava_next, pixels, sizes)
    # reference prompt: each image's placeholders replaced by all its 16 * crops tokens
    counts = [52, 88]
    rows = []
    for b in range(2):
        row = ids[b, mask[b].bool()].tolist()
        start = row.index(IMG)
        rows.append(row[:start] + [IMG] * feats[b].shape[0] + row[start + counts[b]:])
    ref_ids, ref_mask = _pad_left(rows)
    embeds = llava_next.get_input_embeddings()(ref_ids)
    embeds[ref_ids == IMG] = torch.cat(feats)
    positions = (ref_mask.cumsum(-1) - 1).clamp_min(0)
    ref = _valid_logits(llava_next, {"inputs_embeds": embeds, "attention_mask": ref_mask, "position_ids": positions})
    # keep = N (16 x crops) differs per image, so each image runs alone against its reference row
    for b, n in enumerate((48, 80)):
        row = ids[b, mask[b].bool()][None]
        for method in ("scope", "holov"):
            pruned = prune_inputs(
                llava_next, method=method, keep=n, input_ids=row, pixel_values=pixels[b : b + 1], image_sizes=sizes[b : b + 1]
            )
            got = _valid_logits(llava_next, pruned)[0]
            torch.testing.assert_close(got, ref[b], atol=ATOL, rtol=1e-5)


def test_llava_next_padded_batch_rows_equal_each_image_alone(llava_next):
    ids, mask, pixels, sizes = _next_batch()
    batch = _valid_logits(
        llava_next, prune_inputs(llava_next, keep=9, input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    )
    for b in range(2):
        row = ids[b, mask[b].bool()][None]
        alone = prune_inputs(llava_next, keep=9, input_ids=row, pixel_values=pixels[b : b + 1], image_sizes=sizes[b : b + 1])
        torch.testing.assert_close(batch[b], _valid_logits(llava_next, alone)[0], atol=ATOL, rtol=1e-5)


# ----------------------------------------------------------------------------- Qwen2.5-VL


_QWEN_TYPE_IDS = "mm_token_type_ids" in inspect.signature(transformers.Qwen2_5_VLForConditionalGeneration.forward).parameters


def _qwen_batch(which=(0, 1)):
    """Row 0: an 8x8-patch image (16 merged tokens), row 1: a 4x8-patch one (8 merged tokens)."""
    grids = [[1, 8, 8], [1, 4, 8]]
    g = torch.Generator().manual_seed(20)
    patches = [torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g) for t, h, w in grids]
    texts = [(_text(4, 21), _text(3, 22)), (_text(7, 23), _text(2, 24))]
    rows = []
    for i in which:
        n = grids[i][0] * grids[i][1] * grids[i][2] // 4
        before, after = texts[i]
        rows.append([1] + before + [Q_START] + [Q_IMG] * n + [Q_END] + after)
    ids, mask = _pad_left(rows)
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.cat([patches[i] for i in which]),
        "image_grid_thw": torch.tensor([grids[i] for i in which]),
    }
    if _QWEN_TYPE_IDS:  # newer processors return it and the model needs it for M-RoPE
        out["mm_token_type_ids"] = (ids == Q_IMG).to(torch.int32)
    return out


@pytest.mark.parametrize("method", ["scope", "holov", "topk"])
def test_qwen_prunes_each_image_to_keep_with_original_positions(qwen, method):
    inputs = _qwen_batch()
    keep = 5
    pruned, info = prune_inputs(qwen, method=method, keep=keep, return_info=True, **inputs)
    indices = info.indices
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    text_per_row = ((ids != Q_IMG) & mask.bool()).sum(1)
    assert pruned["attention_mask"].sum(1).tolist() == (text_per_row + keep).tolist()
    pos = pruned["position_ids"]
    assert pos.shape == (4, 2, pruned["inputs_embeds"].shape[1])

    extra = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if _QWEN_TYPE_IDS else {}
    full, _ = qwen.model.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask, **extra)
    for b in range(2):
        valid = mask[b].bool()
        row_ids, row_pos = ids[b, valid], full[:, b, valid]
        img = (row_ids == Q_IMG).nonzero().flatten()
        kept = img[indices[b]]
        want = torch.cat([row_pos[:, : img[0]], row_pos[:, kept], row_pos[:, img[-1] + 1 :]], dim=1)
        n = want.shape[1]
        assert torch.equal(pos[1:, b, -n:], want)  # text and kept image tokens keep their M-RoPE ids
        assert torch.equal(pos[0, b, -n:], torch.arange(n))

    new = qwen.generate(**pruned, max_new_tokens=3, do_sample=False)
    assert new.shape == (2, 3)


def test_qwen_selection_uses_attention_received_in_the_last_block(qwen):
    inputs = _qwen_batch(which=(0,))
    pre, merged, received = vision_features_and_saliency(qwen, inputs["pixel_values"], inputs["image_grid_thw"])
    # reference: the last block's full attention (one image, one segment), materialized
    block = qwen.model.visual.blocks[-1]
    seen = {}
    hook = block.register_forward_pre_hook(lambda m, a, kw: seen.update(h=a[0], rope=kw["position_embeddings"]), with_kwargs=True)
    out = qwen.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    hook.remove()
    module = sys.modules[type(block).__module__]
    seq = seen["h"].shape[0]
    q, k, _ = block.attn.qkv(block.norm1(seen["h"])).reshape(seq, 3, 4, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = module.apply_rotary_pos_emb_vision(q, k, *seen["rope"])
    attn = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * block.attn.scaling, dim=-1)
    per_patch = attn.mean(dim=(0, 1))  # mean over heads and queries: attention each key receives
    try:
        from transformers.vision_utils import get_vision_window_index  # >= 5.10

        window = get_vision_window_index(inputs["image_grid_thw"], 2, 56, 14)[0]
    except ImportError:
        window = qwen.model.visual.get_window_index(inputs["image_grid_thw"])[0]
    want = per_patch.view(-1, 4).sum(1)[torch.argsort(window)]
    torch.testing.assert_close(received, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged, out.pooler_output)
    assert pre.shape == (16, 4 * 32)

    idx = prune_inputs(qwen, method="scope", keep=6, return_info=True, **inputs)[1].indices[0]
    assert torch.equal(idx, vtprune.fused_scope_select(pre, want * 4, 6, backend="reference"))


def test_qwen_keep_n_reproduces_the_unpruned_logits_and_generation(qwen):
    inputs = _qwen_batch()
    ref = _valid_logits(qwen, dict(inputs))
    ref_new = qwen.generate(**inputs, max_new_tokens=3, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    # keep = N must hold for every image, so each image runs alone against its row of the batch
    for which, n in (((0,), 16), ((1,), 8)):
        for method in ("scope", "holov"):
            pruned = prune_inputs(qwen, method=method, keep=n, **_qwen_batch(which))
            torch.testing.assert_close(_valid_logits(qwen, pruned)[0], ref[which[0]], atol=ATOL, rtol=1e-5)
        new = qwen.generate(**pruned, max_new_tokens=3, do_sample=False)
        assert torch.equal(new[0], ref_new[which[0]])


def test_qwen_padded_batch_rows_equal_each_image_alone(qwen):
    batch = _valid_logits(qwen, prune_inputs(qwen, method="holov", keep=6, **_qwen_batch()))
    for b in range(2):
        alone = _valid_logits(qwen, prune_inputs(qwen, method="holov", keep=6, **_qwen_batch((b,))))[0]
        torch.testing.assert_close(batch[b], alone, atol=ATOL, rtol=1e-5)


# ----------------------------------------------------------------------------- ALVTS


@pytest.fixture(scope="module")
def llava3():
    torch.manual_seed(4)
    cfg = transformers.LlavaConfig(
        vision_config=_clip_config(), text_config=_llama_config(layers=3), image_token_index=IMG, image_seq_length=16
    )
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def _alvts_batch():
    rows = [[1] + _text(3, 30) + [IMG] * 16 + _text(5, 31), [1] + _text(6, 32) + [IMG] * 16 + _text(3, 33)]
    ids, mask = _pad_left(rows)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(34))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # a padded batch: 4-D bool / additive masks cut down
def test_alvts_ratio_one_is_the_unmodified_model(llava3, attn):
    model = llava3
    if attn == "eager":
        model = copy.deepcopy(llava3)
        model.set_attn_implementation("eager")
    inputs = _alvts_batch()
    ref = model(**inputs).logits
    with apply_layerwise(model, lowrank_selectors(model, rank=4), ratio=1.0) as routing:
        got = model(**inputs).logits
    assert sorted(routing.kept) == [0, 1, 2] and all(v.shape == (2, 16) for v in routing.kept.values())
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(model(**inputs).logits, ref)  # removed: the model is itself again


def test_alvts_half_ratio_routes_floor_half_of_the_visual_tokens(llava3):
    inputs = _alvts_batch()
    selectors = lowrank_selectors(llava3, rank=4)
    visual = inputs["input_ids"] == IMG
    with apply_layerwise(llava3, selectors, ratio=0.5) as routing:
        out = llava3(**inputs, output_hidden_states=True)
    hs = out.hidden_states
    layers = llava3.model.language_model.layers
    for i in range(3):
        kept = routing.kept[i]
        assert kept.shape == (2, math.floor(0.5 * 16))
        assert bool(visual.gather(1, kept).all()) and bool((kept.diff(dim=-1) > 0).all())
        # the selection is the layer's top-k of its ALVTS scores on the layer's normalized input
        scores = vtprune.alvts_scores(
            layers[i].input_layernorm(hs[i]), selectors[i], visual, attention_mask=inputs["attention_mask"], backend="reference"
        )
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :8]
        pos = torch.stack([visual[b].nonzero().flatten() for b in range(2)])
        assert torch.equal(kept, pos.gather(1, top).sort(-1).values)
        if i + 1 < len(hs) - 1:  # the last entry is after the final norm
            pruned = visual.clone()
            pruned.scatter_(1, kept, False)
            assert torch.equal(hs[i + 1][pruned], hs[i][pruned])  # skipped the layer unchanged
            assert not torch.allclose(hs[i + 1][visual & ~pruned], hs[i][visual & ~pruned])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_alvts_routed_tokens_equal_the_layer_on_their_subsequence(llava3, attn):
    """At ratio 0.5, each routed layer's output at the routed tokens (text + kept visual,
    real tokens of a left-padded row) equals the layer run on that sub-sequence alone with
    the tokens' original rotary positions (``cumsum(mask) - 1``) and a plain causal mask;
    pruned visual tokens skip it unchanged. Catches what the selection and ratio-1 checks
    cannot: RoPE ``(cos, sin)`` or the mask cut down wrongly for the shorter sequence."""
    model = llava3
    if attn == "eager":
        model = copy.deepcopy(llava3)
        model.set_attn_implementation("eager")
    lm = model.model.language_model
    inputs = _alvts_batch()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    visual = ids == IMG
    with apply_layerwise(model, lowrank_selectors(model, rank=4), ratio=0.5) as routing:
        hs = model(**inputs, output_hidden_states=True).hidden_states
    assert mask[0].sum() < mask.shape[1]  # row 0 is padded
    for i in range(len(lm.layers)):
        for b in range(2):
            routed = ~visual[b]
            routed[routing.kept[i][b]] = True
            idx = (routed & mask[b].bool()).nonzero().flatten()
            pos = (mask[b].cumsum(0) - 1)[idx][None]
            sub = hs[i][b : b + 1, idx]
            n = len(idx)
            causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            if attn == "eager":
                causal = torch.zeros(1, 1, n, n).masked_fill(~causal, torch.finfo(torch.float32).min)
            out = lm.layers[i](sub, attention_mask=causal, position_embeddings=lm.rotary_emb(sub, pos), position_ids=pos)
            out = out[0] if isinstance(out, tuple) else out
            if i == len(lm.layers) - 1:
                out = lm.norm(out)  # the last hidden state is after the final norm
            else:
                pruned = visual[b] & ~routed
                assert torch.equal(hs[i + 1][b, pruned], hs[i][b, pruned])  # skipped the layer unchanged
            # fp32 hidden states of ~0.1 (~4 after the final norm) agree to ~4e-9 (~2e-7); ATOL is slack,
            # while RoPE positions shifted to 0..L'-1 already move layer 0 by ~1.5e-4
            torch.testing.assert_close(out[0], hs[i + 1][b, idx], atol=ATOL, rtol=0, msg=lambda m: f"layer {i} row {b}: {m}")


def test_alvts_padding_leaves_the_scores_and_picks_of_a_row_unchanged(llava3, monkeypatch):
    """A left-padded row routes the same tokens, on the same scores, as the row alone: the
    scores leave padding out as queries and keys (alvts_scores' attention_mask)."""
    from vtprune.integrations.transformers import alvts as routing_module

    captured = []
    scores_fn = routing_module.alvts_scores
    monkeypatch.setattr(routing_module, "alvts_scores", lambda *a, **kw: captured.append(scores_fn(*a, **kw)) or captured[-1])
    selectors = lowrank_selectors(llava3, rank=4)
    inputs = _alvts_batch()
    real = inputs["attention_mask"][0].bool()
    alone = {"input_ids": inputs["input_ids"][:1, real], "attention_mask": inputs["attention_mask"][:1, real],
             "pixel_values": inputs["pixel_values"][:1]}
    runs = []
    for call in (inputs, alone):
        captured.clear()
        with apply_layerwise(llava3, selectors, ratio=0.5) as routing:
            llava3(**call)
        runs.append((list(captured), dict(routing.kept)))
    (batch_scores, batch_kept), (alone_scores, alone_kept) = runs
    pad = int((~real).sum())
    assert pad > 0 and len(batch_scores) == len(alone_scores) == 3
    for i in range(3):
        torch.testing.assert_close(batch_scores[i][0], alone_scores[i][0], rtol=1e-4, atol=1e-9, msg=lambda m: f"layer {i}: {m}")
        assert torch.equal(batch_kept[i][0] - pad, alone_kept[i][0]), i


def test_alvts_on_pruned_inputs_uses_the_visual_mask(llava3):
    inputs = _alvts_batch()
    pruned, info = prune_inputs(llava3, keep=6, return_info=True, **inputs)
    ref = llava3(**pruned).logits
    with apply_layerwise(llava3, lowrank_selectors(llava3, rank=4), ratio=1.0) as routing:
        routing.visual_mask = info.visual_mask
        got = llava3(**pruned).logits
        assert all(torch.equal(v, routing.kept[0]) for v in routing.kept.values())
        assert bool(info.visual_mask.gather(1, routing.kept[0]).all()) and routing.kept[0].shape == (2, 6)
    valid = pruned["attention_mask"].bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=ATOL, rtol=1e-5)


def test_alvts_generation(llava3):
    inputs = _alvts_batch()
    selectors = lowrank_selectors(llava3, rank=4)
    one = {k: v[1:] for k, v in inputs.items()}  # row 1 has no padding
    with apply_layerwise(llava3, selectors, ratio=0.5):
        new = llava3.generate(**one, max_new_tokens=3, do_sample=False)
        assert new.shape == (1, one["input_ids"].shape[1] + 3)
        with pytest.raises(ValueError, match="unpadded batch"):
            llava3.generate(**inputs, max_new_tokens=2, do_sample=False)
    with apply_layerwise(llava3, selectors, ratio=1.0):
        routed = llava3.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(routed, llava3.generate(**inputs, max_new_tokens=3, do_sample=False))


def test_alvts_mixed_unrouted_layers_generate_under_sdpa_and_refuse_eager(llava3):
    """Unrouted layers (``None``) cache all ``L`` tokens, routed ones fewer: SDPA decodes
    without a mask and attends to each layer's own cache; eager builds one mask for one
    length, so it must refuse with the workaround instead of a size mismatch."""
    one = {k: v[1:] for k, v in _alvts_batch().items()}  # row 1 has no padding
    selectors = lowrank_selectors(llava3, rank=4)
    mixed = [selectors[0], None, selectors[2]]
    with apply_layerwise(llava3, mixed, ratio=0.5) as routing:
        new = llava3.generate(**one, max_new_tokens=3, do_sample=False)
        assert new.shape == (1, one["input_ids"].shape[1] + 3) and sorted(routing.kept) == [0, 2]
    eager = copy.deepcopy(llava3)
    eager.set_attn_implementation("eager")
    with apply_layerwise(eager, mixed, ratio=0.5):
        with pytest.raises(ValueError, match="route every layer.*sdpa"):
            eager.generate(**one, max_new_tokens=3, do_sample=False)
        text = {"input_ids": one["input_ids"][:, :5], "attention_mask": one["attention_mask"][:, :5]}
        eager.generate(**text, max_new_tokens=2, do_sample=False)  # no visual tokens: every cache is full
    with apply_layerwise(eager, mixed, ratio=1.0):  # nothing shortened: equal caches
        routed = eager.generate(**one, max_new_tokens=3, do_sample=False)
    assert torch.equal(routed, eager.generate(**one, max_new_tokens=3, do_sample=False))


@pytest.fixture(scope="module")
def llama3():
    torch.manual_seed(5)
    return transformers.LlamaForCausalLM(_llama_config(layers=3)).eval()


def test_alvts_causal_lm_without_image_token_uses_the_visual_mask(llama3):
    """A plain causal LM has no image token: ``visual_mask`` marks the visual tokens of calls
    of its shape (``inputs_embeds`` or ``input_ids``); other ``input_ids`` calls (text-only
    forwards, ``generate``'s decode steps) have none and run the layers unrouted."""
    g = torch.Generator().manual_seed(35)
    embeds = torch.randn(1, 20, 32, generator=g)
    ids = torch.randint(3, 100, (1, 20), generator=g)
    visual = torch.zeros(1, 20, dtype=torch.bool)
    visual[0, 4:14] = True
    ones = torch.ones(1, 20, dtype=torch.long)
    text = ids[:, :5]
    ref_text = llama3(input_ids=text).logits
    ref_gen = llama3.generate(inputs_embeds=embeds, attention_mask=ones, max_new_tokens=3, do_sample=False)
    selectors = lowrank_selectors(llama3, rank=4)
    with apply_layerwise(llama3, selectors, ratio=0.5) as routing:
        torch.testing.assert_close(llama3(input_ids=text).logits, ref_text)  # no visual_mask: unrouted
        assert routing.kept == {}
        routing.visual_mask = visual
        torch.testing.assert_close(llama3(input_ids=text).logits, ref_text)  # another shape: unrouted
        assert routing.kept == {}
        llama3(input_ids=ids)  # visual_mask's shape: routed
        assert sorted(routing.kept) == [0, 1, 2] and all(v.shape == (1, 5) for v in routing.kept.values())
        routing.kept.clear()
        new = llama3.generate(inputs_embeds=embeds, attention_mask=ones, max_new_tokens=3, do_sample=False)
        assert new.shape == (1, 3) and sorted(routing.kept) == [0, 1, 2]
    with apply_layerwise(llama3, selectors, ratio=1.0) as routing:
        routing.visual_mask = visual
        routed = llama3.generate(inputs_embeds=embeds, attention_mask=ones, max_new_tokens=3, do_sample=False)
        assert all(bool(visual.gather(1, v).all()) and v.shape == (1, 10) for v in routing.kept.values())
    assert torch.equal(routed, ref_gen)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_argument(llava, qwen):
    ids, mask, pixels = _llava_batch()
    base = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with pytest.raises(ValueError, match="keep must be <= N = 16"):
        prune_inputs(llava, keep=17, **base)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_inputs(llava, keep=0, **base)
    with pytest.raises(ValueError, match="method must be one of"):
        prune_inputs(llava, method="random", **base)
    with pytest.raises(ValueError, match="alpha is not used by method='topk'"):
        prune_inputs(llava, method="topk", alpha=1.0, keep=4, **base)
    with pytest.raises(ValueError, match="method_options"):
        prune_inputs(llava, keep=4, method_options={"rank_by": "score"}, **base)
    with pytest.raises(TypeError, match="unexpected processor outputs"):
        prune_inputs(llava, keep=4, token_type_ids=ids, **base)
    with pytest.raises(ValueError, match="image tokens"):
        prune_inputs(llava, keep=4, input_ids=ids, attention_mask=mask, pixel_values=pixels[:2])
    with pytest.raises(TypeError, match="model must be one of"):
        prune_inputs(llava.model.language_model, keep=4, **base)
    with pytest.raises(ValueError, match="video"):
        prune_inputs(qwen, keep=4, pixel_values_videos=torch.zeros(1), **_qwen_batch())
    with pytest.raises(ValueError, match="ratio must be"):
        apply_layerwise(llava, lowrank_selectors(llava, 2), ratio=1.5)
    with pytest.raises(ValueError, match="one LowRankSelector"):
        apply_layerwise(llava, lowrank_selectors(llava, 2)[:1], ratio=0.5)
    with pytest.raises(ValueError, match="visual_mask"), apply_layerwise(llava, lowrank_selectors(llava, 2), ratio=0.5):
        llava(inputs_embeds=torch.zeros(1, 4, 32))


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'vtprune\[transformers\]'"):
        _compat.require_transformers()


def test_too_old_transformers_is_refused(monkeypatch):
    # building a model can re-create the lazy `transformers` module: patch the one imports see
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError, match=f">= {_compat.MIN_VERSION_STR}"):
        _compat.require_transformers()
