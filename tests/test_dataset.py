"""Tests for autosam_core.data.dataset (pairing by stem, splits; docs/DESIGN.md section 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import autosam_core
from autosam_core.data import (load_image, load_mask,
    Pair,
    SplitNotFoundError,
    data_root,
    pair_by_stem,
    read_split,
)


def _save_rgb(path: Path, h: int, w: int, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)


def _save_mask(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    Image.fromarray(mask, mode="L").save(path)


@pytest.fixture
def messy_dataset(tmp_path: Path) -> Path:
    """a: size mismatch (image W x H 517x389, mask 516x389); b: good; c: no mask; d: orphan mask."""
    root = tmp_path / "messy"
    _save_rgb(root / "images" / "a.png", 389, 517)
    _save_mask(root / "masks" / "a.png", 389, 516)
    _save_rgb(root / "images" / "b.jpg", 40, 60)
    _save_mask(root / "masks" / "b.png", 40, 60)
    _save_rgb(root / "images" / "c.jpg", 40, 60)
    _save_mask(root / "masks" / "d.png", 40, 60)
    (root / "images" / "notes.txt").write_text("not an image")
    return root


def test_pair_by_stem_reports_every_skip(messy_dataset: Path):
    report = pair_by_stem(messy_dataset / "images", messy_dataset / "masks")

    assert report.pairs == [
        Pair("b", messy_dataset / "images" / "b.jpg", messy_dataset / "masks" / "b.png")
    ]
    assert report.missing_masks == ["c"]
    assert report.orphan_masks == ["d"]
    assert report.size_mismatch == [("a", (389, 517), (389, 516))]
    assert report.missing_from_split == []
    assert report.num_used == 1 and report.num_skipped == 3

    summary = report.summary()
    assert "\n" not in summary
    assert "1 pair used" in summary and "3 skipped" in summary
    assert "1 missing mask (c)" in summary
    assert "1 orphan mask (d)" in summary
    assert "1 size mismatch" in summary and "517" in summary and "516" in summary


def test_pairing_never_pads_and_pairs_load_as_uint8(messy_dataset: Path):
    report = pair_by_stem(messy_dataset / "images", messy_dataset / "masks")
    assert [p.stem for p in report.pairs] == ["b"]
    assert report.size_mismatch[0][0] == "a"  # 517 vs 516 rows: rejected, never padded
    pair = report.pairs[0]
    image, mask = load_image(pair.image_path), load_mask(pair.mask_path)
    assert image.dtype == np.uint8 and image.shape == (40, 60, 3)
    assert mask.dtype == np.uint8 and mask.shape == (40, 60)
    assert set(np.unique(mask)) == {0, 1}


def test_clean_dataset_pairs_in_natural_order(tmp_path: Path):
    for stem in ("x1", "x2", "x10"):
        _save_rgb(tmp_path / "ok" / "images" / f"{stem}.jpg", 16, 20)
        _save_mask(tmp_path / "ok" / "masks" / f"{stem}.png", 16, 20)
    report = pair_by_stem(tmp_path / "ok" / "images", tmp_path / "ok" / "masks")
    assert [p.stem for p in report.pairs] == ["x1", "x2", "x10"]  # natural order
    assert report.summary() == "3 pairs used, 0 skipped"


def test_split_selection_and_missing_from_split(messy_dataset: Path):
    splits = messy_dataset / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("c\n\nb\n  e  \n")
    (splits / "test.txt").write_text("b\n")

    assert read_split(messy_dataset, "train") == ["c", "b", "e"]
    assert read_split(messy_dataset, "test.txt") == ["b"]

    report = pair_by_stem(messy_dataset / "images", messy_dataset / "masks",
                          stems=read_split(messy_dataset, "train"))
    assert [p.stem for p in report.pairs] == ["b"]
    assert report.missing_masks == ["c"]
    assert report.missing_from_split == ["e"]
    assert report.orphan_masks == []  # d is outside the split
    assert "1 missing from split (e)" in report.summary()


def test_read_split_errors(messy_dataset: Path):
    splits = messy_dataset / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("b\n")
    (splits / "val.txt").write_text("b\nc\nb\n")

    with pytest.raises(SplitNotFoundError) as info:
        read_split(messy_dataset, "test")
    msg = str(info.value)
    assert "test.txt" in msg and "train" in msg and "val" in msg
    assert isinstance(info.value, FileNotFoundError)

    with pytest.raises(ValueError, match="val.txt"):
        read_split(messy_dataset, "val")


def test_mask_extension_preference_and_ambiguous_images(tmp_path: Path):
    root = tmp_path / "ext"
    _save_rgb(root / "images" / "p.jpg", 10, 12)
    _save_mask(root / "masks" / "p.jpg", 10, 12)
    _save_mask(root / "masks" / "p.png", 10, 12)
    _save_rgb(root / "images" / "q.jpg", 10, 12)
    _save_rgb(root / "images" / "q.png", 10, 12)
    _save_mask(root / "masks" / "q.png", 10, 12)
    _save_rgb(root / "images" / "r.TIFF", 10, 12)
    _save_mask(root / "masks" / "r.bmp", 10, 12)

    report = pair_by_stem(root / "images", root / "masks")

    by_stem = {p.stem: p for p in report.pairs}
    assert set(by_stem) == {"p", "r"}
    assert by_stem["p"].mask_path.name == "p.png"
    assert by_stem["r"].mask_path.name == "r.bmp"
    assert [s for s, _ in report.ambiguous_images] == ["q"]
    assert "ambiguous" in report.summary()


def test_missing_masks_folder_is_an_error(tmp_path: Path):
    root = tmp_path / "empty"
    _save_rgb(root / "images" / "only.jpg", 10, 12)
    (root / "masks").mkdir()
    assert pair_by_stem(root / "images", root / "masks").pairs == []
    with pytest.raises(FileNotFoundError, match="masks"):
        pair_by_stem(root / "images", root / "no_masks_here")


def test_data_root_env_and_default(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("AUTOSAM_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("AUTOSAM_DATA")
    repo_root = Path(autosam_core.__file__).resolve().parent.parent
    assert data_root() == repo_root.parent / "shared" / "data"


def test_real_cvc_clinicdb_pranet_test():
    root = data_root() / "CVC-ClinicDB"
    if not (root / "images").is_dir():
        pytest.skip(f"real data not available at {root}")
    report = pair_by_stem(root / "images", root / "masks", stems=read_split(root, "pranet_test"))
    assert len(report.pairs) == 62
    assert report.num_skipped == 0
    image, mask = load_image(report.pairs[0].image_path), load_mask(report.pairs[0].mask_path)
    assert image.shape == (288, 384, 3) and image.dtype == np.uint8
    assert mask.shape == (288, 384) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= {0, 1}


def test_a_misspelt_dataset_name_gets_the_closest_names_in_the_error(tmp_path, monkeypatch):
    from autosam_core.config import ConfigError, DataRef
    from autosam_core.data.dataset import resolve_dataset_dir

    for name in ("Kvasir-SEG", "CVC-ClinicDB", "CVC-ColonDB"):
        (tmp_path / name / "images").mkdir(parents=True)
        (tmp_path / name / "masks").mkdir()
    (tmp_path / "Kvasir-SEG-notes").mkdir()  # no images/ and masks/: never suggested
    monkeypatch.setenv("AUTOSAM_DATA", str(tmp_path))
    assert resolve_dataset_dir(DataRef(dataset="Kvasir-SEG")) == tmp_path / "Kvasir-SEG"
    with pytest.raises(ConfigError) as err:
        resolve_dataset_dir(DataRef(dataset="Kvasr-SEG"))
    assert "did you mean 'Kvasir-SEG'?" in str(err.value) and "notes" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve_dataset_dir(DataRef(dataset="CVC-ClinicDBB"))
    assert "'CVC-ClinicDB'" in str(err.value).split("did you mean", 1)[1]
    with pytest.raises(ConfigError) as err:
        resolve_dataset_dir(DataRef(dataset="GlaS"))
    assert "did you mean" not in str(err.value)
