"""Benchmark rows: prompt construction by hand, and a full run on the tiny SAM."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from autosam_core.benchmark import METHODS, bounding_box, farthest_interior_point, run_benchmark
from autosam_core.config import DataRef, ModelConfig, SamConfig
from autosam_core.model_factory import build_autosam


def test_farthest_interior_point_and_box():
    m = np.zeros((50, 80), np.uint8)
    m[10:31, 20:61] = 1  # 21 x 41 rectangle: centre row 20, the farthest points lie on row 20
    r, c = farthest_interior_point(m)
    assert r == 20 and 30 <= c <= 50
    assert bounding_box(m) == (20, 10, 60, 30)
    m2 = np.zeros((10, 10), np.uint8)
    m2[0:3, 0:3] = 1  # touching the image border: the border counts as boundary
    assert farthest_interior_point(m2) == (1, 1)
    assert farthest_interior_point(np.zeros((5, 5))) is None and bounding_box(np.zeros((5, 5))) is None


def test_benchmark_runs_every_row(tmp_path, tiny_sam):
    d = tmp_path / "Toy"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(60, 90), (90, 60), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "images" / f"t{i}.png")
        m = np.zeros((h, w), np.uint8)
        if i < 2:
            m[10:40, 20:50] = 255  # t2 has an empty ground truth
        Image.fromarray(m).save(d / "masks" / f"t{i}.png")
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(backbone="hardnet68", g_input_size=64, surrogate=True),
                          sam=tiny_sam)
    res = run_benchmark(model, [DataRef(dataset=str(d), name="Toy")], tmp_path / "out", progress=False,
                        meta={"sam_kind": "tiny", "backbone": "hardnet68"})
    ds = res["datasets"]["Toy"]
    assert ds["num_images"] == 3 and ds["empty_ground_truth"] == 1
    assert set(ds["methods"]) == set(METHODS)
    assert ds["methods"]["sam_point"]["num_images"] == 2 and ds["methods"]["sam_box"]["num_images"] == 2
    assert ds["methods"]["autosam"]["num_images"] == 3
    for m in ds["methods"].values():
        assert 0 <= m["iou"] <= m["dice"] <= 1
    md = (tmp_path / "out" / "BENCHMARK.md").read_text()
    assert "SAM w/ GT box prompt" in md and "Paper" in md
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text())["datasets"]["Toy"]["num_images"] == 3
    assert (tmp_path / "out" / "dice_by_method.png").is_file() and (tmp_path / "out" / "examples_Toy.png").is_file()


def test_benchmark_autosam_row_with_hflip_tta_equals_evaluation(tmp_path, tiny_sam):
    from autosam_core.data.cache import EmbeddingCache
    from autosam_core.data.dataset import resolve_pairs
    from autosam_core.evaluation import evaluate_pairs

    d = tmp_path / "Toy"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(60, 90), (90, 60)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "images" / f"t{i}.png")
        m = np.zeros((h, w), np.uint8)
        m[10:40, 5:30] = 255  # off-centre: mirroring changes the first pass
        Image.fromarray(m).save(d / "masks" / f"t{i}.png")
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(backbone="hardnet68", g_input_size=64, refine="box",
                                                              tta="hflip"), sam=tiny_sam)
    ref = DataRef(dataset=str(d), name="Toy")
    res = run_benchmark(model, [ref], tmp_path / "out", methods=["autosam"], cache_dir=tmp_path / "cache",
                        progress=False, meta={"sam_kind": "tiny", "tta": model.tta})
    expected = evaluate_pairs(model, resolve_pairs(ref), EmbeddingCache(tiny_sam, tmp_path / "cache"))
    got = res["datasets"]["Toy"]["methods"]["autosam"]
    assert expected["dice"] > 0.1  # not a trivial 0 = 0 (0.188 here; 0.178 without tta)
    assert got["num_images"] == 2 and abs(got["dice"] - expected["dice"]) < 1e-6
    assert abs(got["iou"] - expected["iou"]) < 1e-6
    assert len(list((tmp_path / "cache").rglob("*hflip*"))) == 2  # the mirrored entries were cached once
    assert "(tta: hflip)" in (tmp_path / "out" / "BENCHMARK.md").read_text()
