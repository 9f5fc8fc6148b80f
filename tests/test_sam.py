"""Frozen SAM: preprocessing, batch invariance of the decoder, postprocessing, checkpoint checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autosam_core.metrics import dice_iou
from autosam_core.sam import SamCheckpointError, load_frozen_sam, read_state_dict, resized_shape
from tests.conftest import save_as_if_cuda


def test_tiny_sam_is_frozen(tiny_sam):
    tiny_sam.train()
    assert not tiny_sam.training
    assert all(not m.training for m in tiny_sam.modules())
    assert sum(p.requires_grad for p in tiny_sam.parameters()) == 0
    emb = tiny_sam.encode(torch.zeros(1, 3, 256, 256))
    assert emb.shape == (1, 256, 64, 64)
    assert emb.grad_fn is None and not emb.requires_grad  # no autograd history through the frozen encoder
    assert not torch.is_inference(emb)  # but a tensor g's convolutions can save for backward (sam_head)


def test_preprocess_normalises_once_and_pads_bottom_right(tiny_sam):
    image = np.full((100, 200, 3), 100, np.uint8)  # landscape: width becomes 256
    x, input_size = tiny_sam.preprocess(image)
    assert x.shape == (3, 256, 256) and input_size == (128, 256)
    mean, std = tiny_sam.spec.pixel_mean, tiny_sam.spec.pixel_std
    for c in range(3):
        assert torch.allclose(x[c, :128], torch.full((128, 256), (100 - mean[c]) / std[c]), atol=1e-4)
    assert torch.count_nonzero(x[:, 128:]) == 0


def test_lite_medsam_scales_to_unit_range(lite_sam):
    x, size = lite_sam.preprocess(np.full((64, 64, 3), 255, np.uint8))
    assert size == (256, 256) and torch.allclose(x, torch.ones_like(x))


def test_decoder_batch_invariance_and_no_cross_sample_gradient(tiny_sam):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 256, 256)
    emb = tiny_sam.encode(images)
    dense = (torch.randn(3, 256, 64, 64) * 0.5).requires_grad_(True)
    out = tiny_sam.decode(emb, dense)
    assert out.shape == (3, 1, 256, 256)
    for i in range(3):
        alone = tiny_sam.decode(emb[i:i + 1], dense[i:i + 1])
        assert torch.allclose(alone, out[i:i + 1], atol=1e-5)
    # batch sizes 1-4 give the same output for sample 0
    for b in (1, 2, 4):
        e = torch.cat([emb, emb[:1]])[:b]
        d = torch.cat([dense, dense[:1]])[:b]
        assert torch.allclose(tiny_sam.decode(e, d)[0], out[0], atol=1e-5)
    grad = torch.autograd.grad(out[0].sum(), dense)[0]
    assert grad[0].abs().sum() > 0
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[2]) == 0
    assert all(p.grad is None for p in tiny_sam.parameters())


def test_decoder_accepts_empty_batch(tiny_sam):
    out = tiny_sam.decode(torch.zeros(0, 256, 64, 64), torch.zeros(0, 256, 64, 64))
    assert out.shape == (0, 1, 256, 256)


def test_decode_rejects_mismatched_shapes(tiny_sam):
    with pytest.raises(ValueError, match=r"\(B, 256, 64, 64\)"):
        tiny_sam.decode(torch.zeros(2, 256, 64, 64), torch.zeros(2, 256, 32, 32))


@pytest.mark.parametrize("transpose", [False, True])
def test_postprocess_non_square_corner_rectangle(tiny_sam, transpose):
    gt = np.zeros((389, 517), bool)  # H=389, W=517
    gt[300:389, 420:517] = True
    if transpose:
        gt = gt.T.copy()  # the 389x517 portrait case
    h, w = gt.shape
    # a perfect low-res logit: the ground truth drawn into SAM's padded low-res frame
    lh, lw = resized_shape((h, w), 256)
    m = torch.from_numpy(gt).float()[None, None]
    low = torch.nn.functional.interpolate(m, size=(lh, lw), mode="bilinear", align_corners=False)
    low = torch.nn.functional.pad(low, (0, 256 - lw, 0, 256 - lh))
    logits = (low - 0.5) * 20
    input_size = resized_shape((h, w), tiny_sam.spec.input_size)
    out = tiny_sam.postprocess(logits, input_size, (h, w))
    assert out.shape == (1, 1, h, w)
    _, iou = dice_iou(out[0, 0].numpy() > 0, gt)
    assert iou >= 0.95


def test_vit_kind_mismatch_is_refused_before_building(tmp_path, monkeypatch):
    path = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, path)
    import segment_anything

    def boom(*a, **k):
        raise AssertionError("model was built before the checkpoint check")

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_h", boom)
    with pytest.raises(SamCheckpointError, match="looks like vit_b") as err:
        load_frozen_sam("vit_h", checkpoint=path)
    assert "768" in str(err.value) and "1280" in str(err.value)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(SamCheckpointError, match="nope.pth"):
        load_frozen_sam("vit_b", checkpoint=tmp_path / "nope.pth")
    with pytest.raises(SamCheckpointError, match="needs sam.checkpoint"):
        load_frozen_sam("vit_l")


def test_cuda_saved_checkpoint_loads_on_cpu(tmp_path):
    path = tmp_path / "cuda.pth"
    save_as_if_cuda({"image_encoder.patch_embed.proj.weight": torch.ones(768, 3, 16, 16)}, path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.load(path, weights_only=True)  # proves the file really names a CUDA device
    state = read_state_dict(path)
    assert state["image_encoder.patch_embed.proj.weight"].device.type == "cpu"
    assert float(state["image_encoder.patch_embed.proj.weight"].sum()) == 768 * 3 * 16 * 16
