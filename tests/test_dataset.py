"""Tests for autosam_core.data.dataset (pairing by stem, splits, dataset; docs/DESIGN.md section 6)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import autosam_core
from autosam_core.data import (
    EmptyDatasetError,
    Pair,
    SegmentationDataset,
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


def test_dataset_never_pads_and_logs_summary(messy_dataset: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="autosam_core.data.dataset"):
        ds = SegmentationDataset(messy_dataset)

    assert len(ds) == 1 and ds.stems == ["b"]
    assert ds.report.size_mismatch[0][0] == "a"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "size mismatch" in text and "517" in text and "516" in text and "missing mask" in text

    item = ds[0]
    assert set(item) == {"stem", "image", "mask"}
    assert item["stem"] == "b"
    assert item["image"].dtype == np.uint8 and item["image"].shape == (40, 60, 3)
    assert item["mask"].dtype == np.uint8 and item["mask"].shape == (40, 60)
    assert set(np.unique(item["mask"])) == {0, 1}
    with pytest.raises(IndexError):
        ds[1]


def test_clean_dataset_logs_no_warning(tmp_path: Path, caplog):
    for stem in ("x1", "x2", "x10"):
        _save_rgb(tmp_path / "ok" / "images" / f"{stem}.jpg", 16, 20)
        _save_mask(tmp_path / "ok" / "masks" / f"{stem}.png", 16, 20)
    with caplog.at_level(logging.WARNING, logger="autosam_core.data.dataset"):
        ds = SegmentationDataset(tmp_path / "ok")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert ds.stems == ["x1", "x2", "x10"]  # natural order
    assert ds.report.summary() == "3 pairs used, 0 skipped"


def test_split_selection_and_missing_from_split(messy_dataset: Path):
    splits = messy_dataset / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("c\n\nb\n  e  \n")
    (splits / "test.txt").write_text("b\n")

    assert read_split(messy_dataset, "train") == ["c", "b", "e"]
    assert read_split(messy_dataset, "test.txt") == ["b"]

    ds = SegmentationDataset(messy_dataset, split="train")
    assert ds.stems == ["b"]
    assert ds.report.missing_masks == ["c"]
    assert ds.report.missing_from_split == ["e"]
    assert ds.report.orphan_masks == []  # d is outside the split
    assert "1 missing from split (e)" in ds.report.summary()


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


def test_empty_dataset_and_argument_errors(tmp_path: Path):
    root = tmp_path / "empty"
    _save_rgb(root / "images" / "only.jpg", 10, 12)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "splits" / "all.txt").write_text("only\n")

    with pytest.raises(EmptyDatasetError) as info:
        SegmentationDataset(root, split="all")
    assert str(root) in str(info.value) and "'all'" in str(info.value)
    assert isinstance(info.value, ValueError)

    with pytest.raises(ValueError, match="not both"):
        SegmentationDataset(root, split="all", stems=["only"])
    with pytest.raises(FileNotFoundError, match="masks"):
        pair_by_stem(root / "images", root / "no_masks_here")
    with pytest.raises(FileNotFoundError):
        SegmentationDataset(tmp_path / "does_not_exist")


def test_transform_is_applied(messy_dataset: Path):
    def flip(image, mask):
        return {"image": image[:, ::-1], "mask": mask[:, ::-1]}

    plain = SegmentationDataset(messy_dataset)[0]
    flipped = SegmentationDataset(messy_dataset, transform=flip)[0]
    assert np.array_equal(flipped["mask"], plain["mask"][:, ::-1])


def test_works_with_torch_dataloader(messy_dataset: Path):
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(SegmentationDataset(messy_dataset), batch_size=1)
    batch = next(iter(loader))
    assert batch["stem"] == ["b"]
    assert tuple(batch["image"].shape) == (1, 40, 60, 3) and batch["image"].dtype == torch.uint8


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
    ds = SegmentationDataset(root, split="pranet_test")
    assert len(ds) == 62
    assert ds.report.num_skipped == 0
    item = ds[0]
    assert item["image"].shape == (288, 384, 3) and item["image"].dtype == np.uint8
    assert item["mask"].shape == (288, 384) and item["mask"].dtype == np.uint8
    assert set(np.unique(item["mask"]).tolist()) <= {0, 1}
