"""Issue 9/10 building blocks: batched decoder vs SAM's own code, g options, box refinement,
boundary length, precision/device resolution, learning-rate schedule, presets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from autosam_core.boundary import boundary_length, boundary_ratio
from autosam_core.config import ModelConfig, SamConfig
from autosam_core.model_factory import build_autosam
from autosam_core.training import lr_schedule
from autosam_core.precision import cpu_has_fast_bf16, resolve_device, resolve_precision
from autosam_core.prompt_generator import PromptGenerator


def test_batched_decoder_equals_segment_anything_loop(tiny_sam):
    torch.manual_seed(1)
    emb = tiny_sam.encode(torch.randn(3, 3, 256, 256))
    dense = torch.randn(3, 256, 64, 64) * 0.3
    batched = tiny_sam.decode(emb, dense)
    loop = tiny_sam.decode_per_sample(emb, dense)  # segment_anything's MaskDecoder.forward per sample
    assert batched.shape == (3, 1, 256, 256) and batched.dtype == torch.float32
    assert (batched - loop).abs().max().item() < 1e-5


def test_batched_decoder_gradient_equals_segment_anything_loop(tiny_sam):
    # the fused attention / channels_last layer norm path must also give SAM's gradient w.r.t. the dense prompt
    torch.manual_seed(3)
    emb = tiny_sam.encode(torch.randn(2, 3, 256, 256))
    weight = torch.randn(2, 1, 256, 256)
    grads = []
    for fn in (tiny_sam.decode, tiny_sam.decode_per_sample):
        dense = (torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(4)) * 0.3).requires_grad_()
        (fn(emb, dense) * weight).sum().backward()
        grads.append(dense.grad)
    assert grads[0].abs().max().item() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_decoder_with_box_tokens_matches_sams_prompt_path(tiny_sam):
    torch.manual_seed(2)
    emb = tiny_sam.encode(torch.randn(1, 3, 256, 256))
    box = torch.tensor([[20.0, 30.0, 120.0, 160.0]])
    no_mask = tiny_sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, 64, 64)
    ours = tiny_sam.decode(emb, no_mask, tiny_sam.box_embeddings(box))
    sams = tiny_sam.prompt_decode(emb, boxes=box)  # prompt encoder + MaskDecoder.forward
    assert (ours - sams).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match=r"sparse_prompt_embeddings of shape \(1, N, 256\)"):
        tiny_sam.decode(emb, no_mask, torch.zeros(2, 2, 256))


def test_box_refinement_prompts_one_box_per_component(tiny_sam, monkeypatch):
    torch.manual_seed(3)
    emb = tiny_sam.encode(torch.randn(2, 3, 256, 256))
    dense = torch.zeros(2, 256, 64, 64)
    first = torch.full((2, 1, 256, 256), -5.0)
    first[0, 0, 10:20, 30:60] = 5.0     # component 1: rows 10-19, cols 30-59
    first[0, 0, 100:140, 100:150] = 5.0  # component 2
    first[0, 0, 200, 200] = 5.0          # speckle: 1 pixel < 10% of the largest component, ignored
    seen = {}
    real_decode = tiny_sam.decode

    def spy(image_embeddings, dense_prompt_embeddings, sparse_prompt_embeddings=None):
        if sparse_prompt_embeddings is not None:
            seen["n"] = sparse_prompt_embeddings.shape[0]
        return real_decode(image_embeddings, dense_prompt_embeddings, sparse_prompt_embeddings)

    boxes = {}
    real_boxes = tiny_sam.box_embeddings

    def box_spy(b):
        boxes["b"] = b
        return real_boxes(b)

    monkeypatch.setattr(tiny_sam, "decode", spy)
    monkeypatch.setattr(tiny_sam, "box_embeddings", box_spy)
    out = tiny_sam.refine_with_boxes(emb, first, dense)
    assert seen["n"] == 2  # two boxes, both of image 0; image 1 (empty first mask) has none
    assert boxes["b"].tolist() == [[30.0, 10.0, 60.0, 20.0], [100.0, 100.0, 150.0, 140.0]]  # x0, y0, x1, y1
    assert torch.equal(out[1], first[1])  # empty first mask: unchanged
    single = real_decode(emb[:1], dense[:1], real_boxes(torch.tensor([[30.0, 10.0, 60.0, 20.0]])))
    other = real_decode(emb[:1], dense[:1], real_boxes(torch.tensor([[100.0, 100.0, 150.0, 140.0]])))
    assert torch.allclose(out[0], torch.maximum(single[0], other[0]), atol=1e-5)  # union = max of logits


def test_box_refinement_margin_largest_component_and_iterations(tiny_sam, monkeypatch):
    """box_margin grows each box on every side, clipped to the content region; min_fraction 1 keeps
    only the largest component; refine_iterations repeats the box step on its own output."""
    torch.manual_seed(4)
    emb = tiny_sam.encode(torch.randn(1, 3, 256, 256))
    dense = torch.zeros(1, 256, 64, 64)
    first = torch.full((1, 1, 256, 256), -5.0)
    first[0, 0, 2:20, 30:60] = 5.0      # near the top edge: the margin is clipped at y = 0
    first[0, 0, 100:140, 100:150] = 5.0  # the largest component
    calls = []
    real_boxes = tiny_sam.box_embeddings
    monkeypatch.setattr(tiny_sam, "box_embeddings", lambda b: calls.append(b.tolist()) or real_boxes(b))
    tiny_sam.refine_with_boxes(emb, first, dense, box_margin=4.0, valid=[(256, 148)])
    assert calls[-1] == [[26.0, 0.0, 64.0, 24.0], [96.0, 96.0, 148.0, 144.0]]  # x1 clipped to the valid width
    tiny_sam.refine_with_boxes(emb, first, dense, min_fraction=1.0)
    assert calls[-1] == [[100.0, 100.0, 150.0, 140.0]]
    tiny_sam.refine_with_boxes(emb, first, dense, max_boxes=1)
    assert calls[-1] == [[100.0, 100.0, 150.0, 140.0]]  # the largest component only
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head", head_channels=8,
                                                              refine_iterations=2, refine_margin=2.0),
                          sam=tiny_sam)
    steps = []
    monkeypatch.setattr(tiny_sam, "refine_with_boxes", lambda e, lo, d, **kw: steps.append((lo, kw)) or lo + 1)
    model.refine_low_res(emb, first, dense)
    assert len(steps) == 2 and steps[0][0] is first and torch.equal(steps[1][0], first + 1)  # on its own output
    assert steps[0][1]["box_margin"] == 2.0 and steps[0][1]["min_fraction"] == 0.3 and steps[0][1]["max_boxes"] == 8  # preset
    with pytest.raises(ValueError):
        ModelConfig(preset="sam_head", refine_iterations=0)


def test_dilated_head_has_the_same_parameters_and_a_wider_receptive_field():
    plain = PromptGenerator("none", fuse_embeddings=True, head_channels=8)
    dil = PromptGenerator("none", fuse_embeddings=True, head_channels=8, head_dilated=True)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in dil.parameters())
    for g in (plain, dil):
        g.eval()
    torch.manual_seed(0)
    e = torch.randn(1, 256, 64, 64, requires_grad=True)
    reach = {}
    for name, g in (("plain", plain), ("dilated", dil)):
        e.grad = None
        g(None, e)[0, :, 32, 32].sum().backward()
        cols = torch.nonzero(e.grad[0].abs().sum(0)[32] > 0).flatten()
        reach[name] = int(cols.max() - cols.min() + 1)
    assert reach == {"plain": 7, "dilated": 15}


def test_sam_head_prompt_generator_starts_at_sams_no_mask_state(tiny_sam):
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head", head_channels=16, output="offset"),
                          sam=tiny_sam)
    g = model.prompt_generator
    assert not model.reads_images and model.refine == "box_only"
    assert sum(p.numel() for p in g.parameters()) == (256 * 16 * 9 + 16 * 16 * 9 * 2 + 3 * 2 * 16
                                                      + 16 * 256 + 256 + 256)
    emb = torch.randn(2, 256, 64, 64) * 0.1
    g.eval()
    z = model.dense_prompt(emb, None)
    base = tiny_sam.prompt_encoder.no_mask_embed.weight.reshape(1, 256, 1, 1)
    assert z.shape == (2, 256, 64, 64)
    assert (z - base).abs().max().item() <= 0.1 + 1e-6  # gain 0.1 x tanh: within 0.1 of SAM's own prompt
    assert "prompt_generator.prompt_base" not in model.trainable_state()  # comes from SAM, never travels
    z.sum().backward()
    assert g.gain.weight.grad is not None and g.fusion[0].weight.grad.abs().sum() > 0


def test_prompt_generator_option_errors():
    with pytest.raises(ValueError, match="fuse_embeddings"):
        PromptGenerator("none")
    with pytest.raises(ValueError, match="output must be"):
        PromptGenerator("hardnet68", output="sigmoid")
    g = PromptGenerator("none", fuse_embeddings=True, head_channels=8)
    with pytest.raises(ValueError, match=r"image_embeddings of shape \(B, 256, 64, 64\), got \(1, 256, 32, 32\)"):
        g(None, torch.zeros(1, 256, 32, 32))
    with pytest.raises(Exception, match="fuse_embeddings: true"):
        ModelConfig(backbone="none")


def test_presets_expand_and_explicit_keys_win():
    paper = ModelConfig(preset="paper")
    assert (paper.backbone, paper.output, paper.fuse_embeddings, paper.refine) == ("hardnet85", "tanh", False, "none")
    head = ModelConfig(preset="sam_head", head_channels=64, refine="none")
    assert (head.backbone, head.output, head.head_channels, head.refine) == ("none", "tanh", 64, "none")
    assert ModelConfig(**head.model_dump()) == head  # a checkpoint's stored config rebuilds the same model


def test_boundary_length_by_hand():
    m = np.zeros((6, 6), bool)
    m[1:4, 1:4] = True  # 3x3 square: 8 border pixels, 1 interior
    assert boundary_length(m) == 8
    full = np.ones((4, 5), bool)  # touching the image edge counts as boundary
    assert boundary_length(full) == 2 * 5 + 2 * 2
    speckle = np.zeros((6, 6), bool)
    speckle[::2, ::2] = True  # 9 isolated pixels: every one is boundary
    assert boundary_ratio(speckle, m) == 9 / 8
    assert boundary_ratio(m, np.zeros((6, 6), bool)) is None
    assert boundary_ratio(np.zeros((6, 6), bool), m) == 0.0


def test_precision_and_device_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", cpu)
    assert resolve_device("cpu") == cpu
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            resolve_device("cuda:0")


def test_channels_last_follows_the_measured_hardware_rule(monkeypatch, tiny_sam, tmp_path):
    import autosam_core.precision as precision
    from autosam_core.config import DataRef, SiteConfig
    from autosam_core.training import SiteTrainer

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    avx2 = frozenset({"flags", "sse2", "avx", "avx2", "fma"})
    monkeypatch.setattr(precision, "_cpu_flags", lambda: avx2)
    assert not precision.prefers_channels_last(cpu, "fp32") and not precision.cpu_has_fast_bf16()
    monkeypatch.setattr(precision, "_cpu_flags", lambda: avx2 | {"avx512f", "avx512_bf16"})
    assert precision.prefers_channels_last(cpu, "fp32") and precision.prefers_channels_last(cpu, "bf16")
    assert precision.cpu_has_fast_bf16()
    assert not precision.prefers_channels_last(cuda, "fp32")
    assert precision.prefers_channels_last(cuda, "bf16") and precision.prefers_channels_last(cuda, "fp16")

    from PIL import Image
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8), mode="L").save(tmp_path / "masks" / "a.png")
    site = SiteConfig(site_id="s", data=DataRef(dataset=str(tmp_path)), precision="fp32", val_fraction=0.0)
    for flags, expected in ((avx2, False), (avx2 | {"avx512f"}, True)):
        monkeypatch.setattr(precision, "_cpu_flags", lambda flags=flags: flags)
        model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head"), sam=tiny_sam)
        SiteTrainer(model, site, cache_dir=tmp_path / "cache", progress=False)
        assert model.channels_last is expected
        first = model.prompt_generator.fusion[0].weight
        assert first.is_contiguous(memory_format=torch.channels_last) is expected


def test_cpu_flags_are_read_from_the_flags_line():
    import autosam_core.precision as precision

    flags = precision._cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert "fpu" in flags or not flags  # every x86 CPU lists fpu; empty only where the file has no flags line
    assert precision.cpu_has_fast_bf16() == bool({"amx_bf16", "avx512_bf16"} & flags)


def test_cosine_schedule_by_hand():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = lr_schedule(opt, total_steps=20, schedule="cosine", warmup_fraction=0.1)  # 2 warm-up steps
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert lrs[-1] < 0.01
    const = lr_schedule(torch.optim.SGD([p], lr=0.3), 5, "constant")
    assert const.get_last_lr() == [0.3]



def test_dp_sgd_trains_the_sam_head(tiny_sam):
    """The sam_head g (reads SAM's embeddings, no image) is DP-compatible and trains under DP-SGD."""
    from autosam_core.privacy import dp_train_epochs, make_autosam_private_compatible

    model = make_autosam_private_compatible(
        build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head", head_channels=16), sam=tiny_sam))
    gen = torch.Generator().manual_seed(0)
    items = []
    for _ in range(4):
        mask = np.zeros((48, 64), np.uint8)
        mask[10:30, 20:40] = 1
        target, (h, w) = model.low_res_target(mask)
        items.append({"image_embeddings": torch.randn(256, 64, 64, generator=gen).half(), "target": target,
                      "valid": torch.tensor([h, w])})
    before = {k: v.clone() for k, v in model.trainable_state().items()}
    stats = dp_train_epochs(model, items, epochs=1, batch_size=2, noise_multiplier=1.0, max_grad_norm=1.0,
                            lr=1e-3, weight_decay=0.0, insecure_seed=0)
    assert stats["steps"] >= 1
    after = model.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_mirror_low_res_flips_inside_the_content_region_by_hand():
    from autosam_core.autosam import mirror_low_res

    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = mirror_low_res(x, valid=[(4, 3), (4, 4)])
    # image 0: content 3 columns wide, column 3 is padding and stays
    assert out[0, 0, 0].tolist() == [2.0, 1.0, 0.0, 3.0]
    assert out[1, 0, 2].tolist() == [27.0, 26.0, 25.0, 24.0]
    assert torch.equal(mirror_low_res(out, valid=[(4, 3), (4, 4)]), x)  # its own inverse
    assert torch.equal(mirror_low_res(x), x.flip(-1))
    with pytest.raises(ValueError, match="2 regions for 1 images"):
        mirror_low_res(x[:1], valid=[(4, 3), (4, 4)])


def test_hflip_tta_averages_the_first_pass_with_the_mirrored_one(tiny_sam):
    from autosam_core.autosam import mirror_low_res
    from autosam_core.data.cache import mirror

    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head", head_channels=16, refine="none",
                                                              tta="hflip"), sam=tiny_sam)
    model.eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)  # wide: content 160 x 256 of the low-res frame
    x = tiny_sam.preprocess(image)[0][None]
    xm = tiny_sam.preprocess(mirror(image))[0][None]
    emb, emb_m = tiny_sam.encode(x), tiny_sam.encode(xm)
    valid = [(160, 256)]
    with torch.no_grad():
        first = tiny_sam.decode(emb, model.dense_prompt(emb, None))
        first_m = tiny_sam.decode(emb_m, model.dense_prompt(emb_m, None))
        got = model.predict_low_res(emb, None, valid=valid, mirrored_embeddings=emb_m)
    expected = (first + mirror_low_res(first_m, valid)) / 2
    assert got.shape == (1, 1, 256, 256)
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - first).abs().max().item() > 1e-4  # the mirrored pass changed something
    with pytest.raises(ValueError, match="mirrored image's embeddings"):
        model.predict_low_res(emb, None, valid=valid)
    # predict_logits encodes the mirrored image itself when it is not given, to the same result
    a = model.predict_logits(image, image_embeddings=emb, mirrored_embeddings=emb_m)
    b = model.predict_logits(image, image_embeddings=emb)
    assert a.shape == (40, 64) and (a - b).abs().max().item() < 1e-5
    with pytest.raises(Exception, match="tta"):
        ModelConfig(preset="sam_head", tta="vflip")


def test_evaluation_with_hflip_tta_caches_and_uses_the_mirrored_embeddings(tiny_sam, tmp_path):
    from PIL import Image

    from autosam_core.data.cache import EmbeddingCache
    from autosam_core.data.dataset import Pair
    from autosam_core.evaluation import evaluate_pairs
    from autosam_core.metrics import dice_iou

    rng = np.random.default_rng(1)
    pairs = []
    for i in range(3):
        im, mk = tmp_path / f"im{i}.png", tmp_path / f"mk{i}.png"
        Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(im)
        m = np.zeros((30, 50), np.uint8)
        m[5:20, 10 + 5 * i:40] = 255
        Image.fromarray(m, mode="L").save(mk)
        pairs.append(Pair(f"s{i}", im, mk))
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head", head_channels=16, tta="hflip"),
                          sam=tiny_sam)
    cache = EmbeddingCache(tiny_sam, tmp_path / "cache")
    res = evaluate_pairs(model, pairs, cache, batch_size=2)
    assert res["num_images"] == 3
    assert all(cache.path(p.image_path, hflip=True).is_file() for p in pairs)
    for pair, r in zip(pairs, res["per_image"]):  # the batch path equals the one-image path, by hand
        image = np.asarray(Image.open(pair.image_path).convert("RGB"))
        pred = model.predict_logits(image, cache.get(pair.image_path), mirrored_embeddings=cache.get(
            pair.image_path, hflip=True)) > 0
        assert r.dice == pytest.approx(dice_iou(pred.numpy(), np.asarray(Image.open(pair.mask_path)) > 0)[0], abs=1e-6)


def test_evaluation_from_the_cache_decodes_no_image_when_g_reads_none(tiny_sam, tmp_path, monkeypatch):
    """sam_head reads only the cached embeddings: evaluation takes each image's size from its header and
    never decodes its pixels (issue 9: 0.3 s of a demo round's 4.5 s central evaluation), same Dice."""
    from PIL import Image

    import autosam_core.evaluation as evaluation
    from autosam_core.data.cache import EmbeddingCache
    from autosam_core.data.dataset import Pair
    from autosam_core.metrics import dice_iou

    rng = np.random.default_rng(2)
    pairs = []
    for i, (h, w) in enumerate([(30, 50), (44, 36)]):  # wide and tall: the size decides the valid region
        im, mk = tmp_path / f"im{i}.png", tmp_path / f"mk{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(im)
        m = np.zeros((h, w), np.uint8)
        m[4:20, 6:30] = 255
        Image.fromarray(m, mode="L").save(mk)
        pairs.append(Pair(f"s{i}", im, mk))
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head", head_channels=16), sam=tiny_sam)
    cache = EmbeddingCache(tiny_sam, tmp_path / "cache")
    cache.ensure([p.image_path for p in pairs], evaluation.load_image, progress=False)

    def no_decoding(path):
        raise AssertionError(f"pixels of {path} decoded")

    monkeypatch.setattr(evaluation, "load_image", no_decoding)
    res = evaluation.evaluate_pairs(model, pairs, cache, batch_size=2)
    monkeypatch.undo()
    assert res["num_images"] == 2
    for pair, r in zip(pairs, res["per_image"]):  # by hand, from the decoded image
        image = np.asarray(Image.open(pair.image_path).convert("RGB"))
        pred = model.predict_logits(image, cache.get(pair.image_path)) > 0
        assert pred.shape == image.shape[:2]
        assert r.dice == pytest.approx(dice_iou(pred.numpy(), np.asarray(Image.open(pair.mask_path)) > 0)[0], abs=1e-6)
    paper = build_autosam(SamConfig(kind="tiny"), ModelConfig(backbone="hardnet68", g_input_size=64), sam=tiny_sam)
    monkeypatch.setattr(evaluation, "load_image", no_decoding)
    with pytest.raises(AssertionError, match="decoded"):  # a g that reads the image still gets its pixels
        evaluation.evaluate_pairs(paper, pairs, cache, batch_size=2)


def test_cli_evaluates_the_validation_hold_out_with_tta(tiny_sam, tmp_path, caplog, capsys):
    import json

    from autosam_core.checkpoint import save_checkpoint
    from autosam_core.cli import main
    from autosam_core.config import DataRef
    from autosam_core.data.dataset import resolve_pairs, split_validation
    from tests.fl_helpers import make_dataset

    data = make_dataset(tmp_path / "ds", n=10, seed=3, size=48)
    g = ModelConfig(preset="sam_head", head_channels=16)
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("name: t\nsam: {kind: tiny}\nmodel: {preset: sam_head, head_channels: 16}\n"
                         "train: {epochs: 1, batch_size: 2, val_fraction: 0.3, seed: 4}\n"
                         f"train_data: [{{dataset: '{data}'}}]\ncache_dir: cache\n")
    meta = {"sam": SamConfig(kind="tiny").model_dump(), "model": g.model_dump(), "sam_kind": "tiny",
            "backbone": g.backbone}
    model = build_autosam(SamConfig(kind="tiny"), g, sam=tiny_sam)
    ckpt = save_checkpoint(tmp_path / "ck.pt", model.trainable_state(), meta)
    out = tmp_path / "r.json"
    with caplog.at_level("INFO", logger="autosam"):
        assert main(["evaluate", "--checkpoint", str(ckpt), "--config", str(yaml_path), "--validation",
                     "--tta", "hflip", "--json", str(out)]) == 0
    assert "test-time augmentation hflip (checkpoint: none)" in caplog.text
    res = json.loads(out.read_text())["results"]
    _, val = split_validation(resolve_pairs(DataRef(dataset=str(data)), tmp_path), 0.3, 4)
    assert list(res) == ["validation"] and res["validation"]["num_images"] == len(val) == 3
    assert len(list((tmp_path / "cache").rglob("*-hflip.pt"))) == 3  # only the hold-out, mirrored
    assert main(["evaluate", "--checkpoint", str(ckpt), "--validation"]) != 0
    assert "error: --validation needs --config" in capsys.readouterr().err


def test_embed_fills_the_mirrored_entries_that_training_and_tta_read(tmp_path, capsys):
    from autosam_core.cli import main
    from tests.fl_helpers import make_dataset

    train, test = make_dataset(tmp_path / "tr", n=3, seed=5, size=48), make_dataset(tmp_path / "te", n=2, seed=6, size=48)
    for train_opts, model_opts, plain, mirrored in (("", "", 5, 0), (", hflip: 0.5", "", 5, 3),
                                                    ("", ", tta: hflip", 5, 5)):
        root = tmp_path / f"run{mirrored}"
        root.mkdir()
        y = root / "t.yaml"
        y.write_text(f"name: t\nsam: {{kind: tiny}}\nmodel: {{preset: sam_head, head_channels: 16{model_opts}}}\n"
                     f"train: {{epochs: 1, batch_size: 2{train_opts}}}\ntrain_data: [{{dataset: '{train}'}}]\n"
                     f"evaluate: [{{dataset: '{test}'}}]\ncache_dir: cache\n")
        assert main(["embed", str(y)]) == 0
        files = list((root / "cache").rglob("*.pt"))
        assert sum(not f.stem.endswith("-hflip") for f in files) == plain
        assert sum(f.stem.endswith("-hflip") for f in files) == mirrored
        assert ("mirrored images: 0 already cached, " in capsys.readouterr().out) == (mirrored > 0)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not cpu_has_fast_bf16(), reason="this CPU has no bf16 units (emulated bf16 takes minutes here)"))])
def test_sam_head_trains_without_the_cache_in_both_precisions(tiny_sam, tmp_path, precision):
    # The uncached (paper-exact) path: SAM encodes each batch, and the sam_head g's first conv saves
    # those embeddings for its weight gradient. Session 14 found that fp32 raised "Inference tensors
    # cannot be saved for backward" (bf16's float32 cast had hidden it).
    from PIL import Image

    from autosam_core.config import DataRef
    from autosam_core.data.dataset import resolve_pairs
    from autosam_core.data.torch_dataset import AutoSamDataset, make_loader
    from autosam_core.training import train_epochs

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / f"im{i}.png")
        m = np.zeros((32, 40), np.uint8)
        m[4:20, 6:30] = 255
        Image.fromarray(m, mode="L").save(tmp_path / "masks" / f"im{i}.png")
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head"), sam=tiny_sam, seed=0)
    tiny_sam.set_precision(precision)
    pairs = resolve_pairs(DataRef(dataset=str(tmp_path)))
    loader = make_loader(AutoSamDataset(model, pairs, "none", cache=None), batch_size=2, shuffle=False)
    before = {k: v.clone() for k, v in model.prompt_generator.state_dict().items()}
    opt = torch.optim.Adam(model.prompt_generator.parameters(), lr=1e-3)
    stats = train_epochs(model, loader, 1, opt, progress=False, recalibrate_bn=False)
    assert stats["steps"] == 1 and math.isfinite(stats["loss"])
    first_conv = model.prompt_generator.fusion[0].weight
    assert not torch.equal(first_conv.detach(), before["fusion.0.weight"])  # the conv reading the embeddings learned
    assert all(not p.requires_grad for p in tiny_sam.parameters())
