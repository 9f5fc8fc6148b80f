"""autosam_core.files: the one atomic write and the one file hash, and the fingerprints built on it."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from autosam_core.files import atomic_copy, atomic_write, atomic_write_bytes, atomic_write_json, file_sha256


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_sha256_streams_and_callers_keep_their_prefixes(tmp_path):
    from autosam_core.data.cache import file_key
    from autosam_fl.connect import marker_path

    data = os.urandom(1) * 10 + bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks
    f = tmp_path / "blob.bin"
    f.write_bytes(data)
    full = hashlib.sha256(data).hexdigest()
    assert file_sha256(f) == full and file_sha256(str(f)) == full
    assert file_key(f) == full[:20]  # embedding-cache key: unchanged
    assert marker_path(tmp_path, "site_a", f).name == f"connection-site_a-{full[:12]}.json"


def test_sam_weights_id_is_the_checkpoints_sha256_prefix(tmp_path):
    import torch

    from autosam_core.sam import load_frozen_sam

    tiny = load_frozen_sam("tiny")
    ckpt = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), ckpt)
    assert load_frozen_sam("tiny", checkpoint=ckpt).weights_id == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12]


def test_atomic_write_replaces_whole_file_and_cleans_up_on_error(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"a": 1}, indent=1)
    assert path.read_text() == '{\n "a": 1\n}' and _mode(path) == 0o600  # owner-only by default

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == '{\n "a": 1\n}'  # the previous file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temporary file left

    atomic_write_bytes(path, b"xyz", mode=0o644)
    assert path.read_bytes() == b"xyz" and _mode(path) == 0o644
    copy = atomic_copy(path, tmp_path / "copy.bin")
    assert copy.read_bytes() == b"xyz"
